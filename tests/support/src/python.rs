//! Running the Python gRPC clients of `tests/grpc_clients/` (probe.py, hostile.py): each takes
//! a target and arguments and prints one JSON report; exit status 3 says its packages are
//! missing (pinned in `tests/grpc_clients/requirements.txt`, installed by `scripts/test`).

use std::process::{Command, Stdio};

use serde_json::Value;

/// The report `tests/grpc_clients/<script>` prints when run with `args`; a panic saying what
/// went wrong (python3 or its packages missing, the script failing, no JSON) otherwise.
pub fn grpc_client_report(script: &str, args: &[String]) -> Value {
    let output = Command::new("python3")
        .current_dir(crate::image::repo_dir())
        .arg(format!("tests/grpc_clients/{script}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| {
            panic!(
                "cannot run python3 ({err}): install it, e.g. with `bash scripts/deps.sh python3`"
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3) => panic!("the Python gRPC client is not installed:\n{stderr}"),
        _ => panic!(
            "{script} {args:?} failed ({}):\n{stderr}\nreport: {stdout}",
            output.status
        ),
    }
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("{script} printed no JSON report ({err}):\n{stdout}"))
}
