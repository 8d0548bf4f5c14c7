//! The hostile client of `hostile.rs` again, in another language than the project's (issue 15):
//! `tests/grpc_clients/hostile.py`, Python grpcio with every type from the controller's
//! reflection, against a real controller over its Unix socket. Oversized and malformed
//! requests are refused with INVALID_ARGUMENT or RESOURCE_EXHAUSTED naming the limit (the
//! rows of docs/limits.md), watchers and image pushes beyond their limits are refused, and
//! afterwards the controller serves and holds nothing a refused request would have created.
//!
//! The Python packages are pinned in `tests/grpc_clients/requirements.txt` and installed by
//! `scripts/test`; without them this test fails and says how to install them.

use std::path::Path;

use fabric_proto::v1::ListVmsRequest;
use fabric_test_support::cluster::{Controller, Timing};
use serde_json::Value;

/// Every case hostile.py must report, each refused as expected.
const CASES: &[&str] = &[
    "CreateVm with a NIC network name of 1 MiB",
    "CreateVm with a spec of 20 KiB in labels and command line",
    "CreateVm with 65 small labels",
    "CreateVm with a zone of bad characters",
    "CordonHost with a reason of 100 KiB",
    "CreateVm in a message of 5 MiB",
    "RegisterHost with 10,000 labels",
    "RegisterHost with a machine id of 1 MiB",
    "RegisterHost with a label value of 100 KB",
    "GetVm with an id of 1 MiB",
    "PushImage with a sha256 of 1 MiB",
    "300 WatchEvents streams never read",
    "12 image pushes at once",
];

fn hostile_py(socket: &Path) -> Value {
    let report = fabric_test_support::python::grpc_client_report(
        "hostile.py",
        &[format!("unix:{}", socket.display())],
    );
    println!("{report}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_hostile_requests_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let controller = Controller::start(&dir.path().join("controller"), Timing::default());
    let socket = controller.socket.clone();
    let report = tokio::task::spawn_blocking(move || hostile_py(&socket))
        .await
        .expect("hostile.py task");

    assert_eq!(report["failures"], serde_json::json!([]), "{report}");
    let cases = report["cases"].as_array().expect("cases");
    let names: Vec<&str> = cases.iter().filter_map(|c| c["case"].as_str()).collect();
    assert_eq!(names, CASES, "the cases run");
    for case in cases {
        assert_eq!(case["ok"], Value::Bool(true), "{case}");
        // Each refused with the code expected of it: INVALID_ARGUMENT or RESOURCE_EXHAUSTED
        // for what is over a limit (NOT_FOUND for an id no VM has, however long).
        if let Some(code) = case["code"].as_str() {
            assert_eq!(case["expected"].as_str(), Some(code), "{case}");
        }
    }
    let after = &report["after"];
    assert_eq!(after["health"], "SERVING");
    assert_eq!(after["vms"], serde_json::json!([]));
    assert_eq!(after["images"], serde_json::json!([]));
    assert_eq!(after["hosts"][0][0], "good");
    assert_eq!(after["hosts"].as_array().map(Vec::len), Some(1));

    // And to a client in Rust too, it serves on with nothing created.
    let vms = controller
        .compute()
        .await
        .list_vms(ListVmsRequest::default())
        .await
        .expect("ListVms after the hostile client")
        .into_inner();
    assert!(vms.vms.is_empty(), "{vms:?}");
}
