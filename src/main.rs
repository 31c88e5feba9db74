fn main() -> std::process::ExitCode {
    credit_worker::cli::main()
}
