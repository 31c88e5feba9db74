// jemalloc instead of the system allocator: with glibc's, allocation and freeing took about a
// fifth of the worker's CPU (docs/benchmarks.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    credit_worker::cli::main()
}
