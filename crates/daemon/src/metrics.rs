//! `GET /v1/metrics`: Prometheus text. Every API request is counted and timed by route template (so
//! checkpoint, rollback and fork latencies are there, as histograms), plus what the daemon holds now.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::daemon::Daemon;

/// Histogram bucket bounds, seconds: a rollback is ~2 ms, a fork of 64 branches ~300 ms.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

#[derive(Default)]
struct Series {
    count: u64,
    sum: f64,
    /// Cumulative counts per bucket bound.
    le: [u64; BUCKETS.len()],
}

/// Request counts and durations by (method, route, status).
#[derive(Default)]
pub struct Metrics {
    series: Mutex<BTreeMap<(String, String, u16), Series>>,
}

impl Metrics {
    fn record(&self, method: &str, route: &str, status: u16, secs: f64) {
        let Ok(mut m) = self.series.lock() else {
            return;
        };
        let s = m
            .entry((method.to_string(), route.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum += secs;
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                s.le[i] += 1;
            }
        }
    }

    /// The request series in Prometheus text format.
    fn render_requests(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP deltabox_http_requests_total API requests by method, route and status.\n\
             # TYPE deltabox_http_requests_total counter"
        );
        let Ok(m) = self.series.lock() else {
            return;
        };
        for ((method, route, status), s) in m.iter() {
            let _ = writeln!(
                out,
                "deltabox_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {}",
                s.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP deltabox_http_request_duration_seconds API request latency by method and route (all statuses).\n\
             # TYPE deltabox_http_request_duration_seconds histogram"
        );
        let mut merged: BTreeMap<(&str, &str), Series> = BTreeMap::new();
        for ((method, route, _), s) in m.iter() {
            let t = merged.entry((method, route)).or_default();
            t.count += s.count;
            t.sum += s.sum;
            for i in 0..BUCKETS.len() {
                t.le[i] += s.le[i];
            }
        }
        for ((method, route), s) in merged {
            let labels = format!("method=\"{method}\",route=\"{route}\"");
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "deltabox_http_request_duration_seconds_bucket{{{labels},le=\"{b}\"}} {}",
                    s.le[i]
                );
            }
            let _ = writeln!(
                out,
                "deltabox_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                 deltabox_http_request_duration_seconds_sum{{{labels}}} {}\n\
                 deltabox_http_request_duration_seconds_count{{{labels}}} {}",
                s.count, s.sum, s.count
            );
        }
    }
}

/// Middleware: counts and times every request by its route template (`/v1/sandboxes/{id}/rollback`), never by
/// raw path (ids would make unbounded series).
pub async fn track(State(d): State<Arc<Daemon>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let method = req.method().to_string();
    let t = Instant::now();
    let resp = next.run(req).await;
    d.metrics.record(
        &method,
        &route,
        resp.status().as_u16(),
        t.elapsed().as_secs_f64(),
    );
    resp
}

/// `GET /v1/metrics`.
#[utoipa::path(get, path = "/v1/metrics", tag = "daemon", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(d): State<Arc<Daemon>>) -> impl IntoResponse {
    let mut out = String::new();
    d.metrics.render_requests(&mut out);
    let g = d.gauges().await;
    let _ = writeln!(
        out,
        "# HELP deltabox_sandboxes Sandboxes the daemon knows, by status.\n# TYPE deltabox_sandboxes gauge"
    );
    for (status, n) in &g.sandboxes {
        let _ = writeln!(out, "deltabox_sandboxes{{status=\"{status}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP deltabox_sandboxes_live Sandboxes with a running init.\n# TYPE deltabox_sandboxes_live gauge\n\
         deltabox_sandboxes_live {}\n\
         # HELP deltabox_checkpoints Checkpoints recorded.\n# TYPE deltabox_checkpoints gauge\n\
         deltabox_checkpoints {}\n\
         # HELP deltabox_process_checkpoints_warm Process checkpoints whose templates are held.\n\
         # TYPE deltabox_process_checkpoints_warm gauge\ndeltabox_process_checkpoints_warm {}",
        g.live, g.checkpoints, g.warm
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

/// What the daemon holds now, for the gauges.
pub struct Gauges {
    pub sandboxes: BTreeMap<String, usize>,
    pub live: usize,
    pub checkpoints: usize,
    pub warm: usize,
}
