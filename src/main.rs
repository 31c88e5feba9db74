// jemalloc instead of the system allocator: with glibc's, allocation and freeing took about a
// fifth of the worker's CPU (docs/benchmarks.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts. One arena: the per-thread caches take the hot
/// small allocations, and the default (four arenas per core) held 10–15 MiB more at peak for
/// no measured gain in CPU. `_RJEM_MALLOC_CONF` in the environment overrides it.
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: &[u8; 10] = b"narenas:1\0";

fn main() -> std::process::ExitCode {
    credit_worker::cli::main()
}
