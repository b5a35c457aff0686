//! The `celery-operator` binary: the command line lives in the library ([`celery_operator::cli`]).

fn main() -> std::process::ExitCode {
    celery_operator::cli::main()
}
