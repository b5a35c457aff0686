//! The control plane of the test tier starts, authenticates, authorizes with RBAC and records
//! every request in its audit log.

use test_control_plane::ControlPlane;

#[test]
fn starts_authorizes_and_audits() {
    let plane = ControlPlane::start();
    let mark = plane.audit_mark();
    let curl = |token: &str, path: &str| plane.get(token, path);
    let version = curl(plane.admin_token(), "/version");
    assert!(version.contains("\"gitVersion\": \"v1.20.2\""), "{version}");
    // A token nobody issued is not a user; the admin is.
    assert!(curl("nobody", "/api/v1/namespaces").starts_with("HTTP/1.1 401"));
    assert!(curl(plane.admin_token(), "/api/v1/namespaces").starts_with("HTTP/1.1 200"));
    let audited: Vec<_> = plane
        .audit_since(mark)
        .into_iter()
        .filter(|e| e.user == "admin" && e.uri == "/api/v1/namespaces")
        .collect();
    assert_eq!(audited.len(), 1, "{audited:?}");
    assert_eq!((audited[0].verb.as_str(), audited[0].code), ("list", 200));
    assert_eq!(audited[0].decision.as_deref(), Some("allow"));
}
