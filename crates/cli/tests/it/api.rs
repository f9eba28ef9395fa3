//! The API surface itself: metrics.

use crate::common::*;

#[test]
fn metrics_count_and_time_requests_by_route_and_show_what_the_daemon_holds() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let c = checkpoint_processes(&d, &id);
    out(&d, &id, &sh, "cd /tmp");
    d.ok(&["rollback", &id, &c]);
    let _ = d.http("GET", "/v1/sandboxes/nosuch", b"");
    let (st, body) = d.http("GET", "/v1/metrics", b"");
    assert_eq!(st, 200);
    let text = String::from_utf8(body).unwrap();
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<f64>()
            .unwrap()
    };
    let rb = "method=\"POST\",route=\"/v1/sandboxes/{id}/rollback\"";
    assert_eq!(
        line(&format!(
            "deltabox_http_requests_total{{{rb},status=\"200\"}}"
        )),
        1.0
    );
    assert_eq!(
        line(&format!(
            "deltabox_http_request_duration_seconds_count{{{rb}}}"
        )),
        1.0
    );
    assert!(
        line(&format!(
            "deltabox_http_request_duration_seconds_sum{{{rb}}}"
        )) > 0.0
    );
    assert_eq!(
        line("deltabox_http_requests_total{method=\"GET\",route=\"/v1/sandboxes/{id}\",status=\"404\"}"),
        1.0
    );
    // Never raw paths (ids would make series without bound).
    assert!(!text.contains(&id), "{text}");
    assert_eq!(line("deltabox_sandboxes{status=\"running\"}"), 1.0);
    assert_eq!(line("deltabox_sandboxes_live"), 1.0);
    assert_eq!(line("deltabox_process_checkpoints_warm"), 1.0);
    d.stop_and_check(&[id]);
}

#[test]
fn malformed_json_wrong_types_and_unknown_fields_are_clear_4xx_and_change_nothing() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let before = d.json(&["ls"]);
    for (method, path, body) in [
        ("POST", "/v1/sandboxes".to_string(), &b"{not json"[..]),
        ("POST", "/v1/sandboxes".to_string(), br#"{"memory": 5}"#),
        ("POST", "/v1/sandboxes".to_string(), br#"{"pids": "many"}"#),
        (
            "POST",
            "/v1/sandboxes".to_string(),
            br#"{"colour": "blue"}"#,
        ),
        ("POST", "/v1/sandboxes".to_string(), br#"[1, 2]"#),
        (
            "POST",
            format!("/v1/sandboxes/{id}/rollback"),
            br#"{"checkpoint": 3}"#,
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/rollback"),
            br#"{"checkpoint": "c-1", "memory": "sideways"}"#,
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"argv": "echo hi"}"#,
        ),
        (
            "POST",
            format!("/v1/sandboxes/{id}/checkpoints"),
            br#"{"processes": "yes"}"#,
        ),
        (
            "POST",
            "/v1/checkpoints/c-000000000000/fork".to_string(),
            br#"{"n": -1}"#,
        ),
        ("POST", "/v1/gc".to_string(), b""),
    ] {
        let (st, v) = d.http_json(method, &path, body);
        assert!(
            (400..500).contains(&st),
            "{method} {path} {:?}: {st} {v}",
            String::from_utf8_lossy(body)
        );
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("{path}: {v}"));
        assert!(!code.is_empty() && !v["error"]["message"].as_str().unwrap().is_empty());
    }
    let (st, v) = d.http_json("GET", "/v1/no/such/endpoint", b"");
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
    assert_eq!(d.json(&["ls"]), before, "nothing was created or changed");
    assert_eq!(d.ok(&["exec", &id, "--", "echo", "fine"]), "fine\n");
    d.stop_and_check(&[id]);
}
