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
        line(&format!("deltabox_http_requests_total{{{rb},status=\"200\"}}")),
        1.0
    );
    assert_eq!(
        line(&format!("deltabox_http_request_duration_seconds_count{{{rb}}}")),
        1.0
    );
    assert!(line(&format!("deltabox_http_request_duration_seconds_sum{{{rb}}}")) > 0.0);
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
