//! Operator tools beside the service core: the benchmark, the demo, their scratch
//! namespace/database, and publishing entries. They are built only on the library's public
//! API, so the service never depends on them.

pub mod bench;
pub mod demo;
pub mod publish;
pub mod scratch;
