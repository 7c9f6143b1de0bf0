//! Prometheus metrics, named like vLLM's where they overlap (`vllm:` becomes `dsv2:`).
//!
//! Latency histograms and token counters are recorded by the request handlers; the
//! engine's gauges (running and waiting sequences, cache blocks, prefix-cache counters)
//! are read from its published statistics when `/metrics` is scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use dsv2_engine::StatsSnapshot;

/// A cumulative histogram with fixed bucket bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistogramData>,
}

#[derive(Debug, Default)]
struct HistogramData {
    /// Per-bucket (non-cumulative) counts; the last is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            inner: Mutex::new(HistogramData {
                counts: vec![0; bounds.len() + 1],
                ..Default::default()
            }),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        let i = self.bounds.partition_point(|&b| b < value);
        let mut d = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        d.counts[i] += 1;
        d.sum += value;
        d.count += 1;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).count
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let d = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&d.counts) {
            cumulative += count;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", d.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", d.sum, d.count);
    }
}

const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    10.0,
];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0,
];

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Arrival to first token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens.
    pub inter_token_latency: Histogram,
    /// Arrival to last token.
    pub e2e_request_latency: Histogram,
    /// Prompt tokens submitted.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub generation_tokens: AtomicU64,
    /// Finished requests by finish reason (`stop`, `length`, `abort`, ...).
    finished: Mutex<BTreeMap<String, u64>>,
    /// Error answers by HTTP status.
    errors: Mutex<BTreeMap<u16, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(ITL_BUCKETS),
            e2e_request_latency: Histogram::new(E2E_BUCKETS),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            finished: Mutex::default(),
            errors: Mutex::default(),
        }
    }
}

impl Metrics {
    /// Counts a finished request (one choice) by its finish reason.
    pub fn record_finished(&self, reason: &str) {
        let mut m = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(reason.to_string()).or_default() += 1;
    }

    /// Counts an error answer.
    pub fn record_error(&self, status: u16) {
        let mut m = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(status).or_default() += 1;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, engine: Option<StatsSnapshot>, ready: bool) -> String {
        let mut out = String::with_capacity(8192);
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge(
            "dsv2:server_ready",
            "1 when the model is loaded and the server admits requests.",
            "gauge",
            u8::from(ready).to_string(),
        );
        let e = engine.unwrap_or_default();
        gauge(
            "dsv2:num_requests_running",
            "Sequences running (holding KV-cache blocks).",
            "gauge",
            e.num_running.to_string(),
        );
        gauge(
            "dsv2:num_requests_waiting",
            "Sequences waiting to be scheduled (new or preempted).",
            "gauge",
            e.num_waiting.to_string(),
        );
        let usage = if e.blocks_total == 0 {
            0.0
        } else {
            e.blocks_used as f64 / e.blocks_total as f64
        };
        gauge(
            "dsv2:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use (1 = full).",
            "gauge",
            usage.to_string(),
        );
        gauge(
            "dsv2:kv_cache_blocks_used",
            "KV-cache blocks held by sequences.",
            "gauge",
            e.blocks_used.to_string(),
        );
        gauge(
            "dsv2:kv_cache_blocks_total",
            "KV-cache blocks in total.",
            "gauge",
            e.blocks_total.to_string(),
        );
        gauge(
            "dsv2:prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache.",
            "counter",
            e.prefix_queries.to_string(),
        );
        gauge(
            "dsv2:prefix_cache_hits_total",
            "Prompt tokens found in the prefix cache.",
            "counter",
            e.prefix_hits.to_string(),
        );
        let hit_rate = if e.prefix_queries == 0 {
            0.0
        } else {
            e.prefix_hits as f64 / e.prefix_queries as f64
        };
        gauge(
            "dsv2:prefix_cache_hit_rate",
            "Prefix-cache hits over queries, in tokens, since start.",
            "gauge",
            hit_rate.to_string(),
        );
        gauge(
            "dsv2:num_preemptions_total",
            "Sequences preempted (to be recomputed) for lack of KV-cache blocks.",
            "counter",
            e.num_preemptions.to_string(),
        );
        gauge(
            "dsv2:engine_steps_total",
            "Forward steps run by the engine.",
            "counter",
            e.num_steps.to_string(),
        );
        gauge(
            "dsv2:prompt_tokens_total",
            "Prompt tokens of admitted requests.",
            "counter",
            self.prompt_tokens.load(Relaxed).to_string(),
        );
        gauge(
            "dsv2:generation_tokens_total",
            "Generated tokens.",
            "counter",
            self.generation_tokens.load(Relaxed).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP dsv2:request_success_total Finished requests (per choice) by finish reason.\n\
             # TYPE dsv2:request_success_total counter"
        );
        let finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        for reason in ["stop", "length", "abort"] {
            if !finished.contains_key(reason) {
                let _ = writeln!(
                    out,
                    "dsv2:request_success_total{{finished_reason=\"{reason}\"}} 0"
                );
            }
        }
        for (reason, n) in finished.iter() {
            let _ = writeln!(
                out,
                "dsv2:request_success_total{{finished_reason=\"{reason}\"}} {n}"
            );
        }
        drop(finished);
        let _ = writeln!(
            out,
            "# HELP dsv2:request_failure_total Requests answered with an error, by HTTP status.\n\
             # TYPE dsv2:request_failure_total counter"
        );
        for (status, n) in self.errors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "dsv2:request_failure_total{{status=\"{status}\"}} {n}");
        }
        self.time_to_first_token.render(
            &mut out,
            "dsv2:time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
        );
        self.inter_token_latency.render(
            &mut out,
            "dsv2:inter_token_latency_seconds",
            "Time between consecutive generated tokens of a request.",
        );
        self.e2e_request_latency.render(
            &mut out,
            "dsv2:e2e_request_latency_seconds",
            "Time from request arrival to its last token.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token.observe(0.003);
        m.time_to_first_token.observe(0.5);
        m.time_to_first_token.observe(1000.0);
        m.record_finished("stop");
        let text = m.render(None, true);
        assert!(text.contains("dsv2:time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("dsv2:time_to_first_token_seconds_bucket{le=\"0.5\"} 2"));
        assert!(text.contains("dsv2:time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("dsv2:time_to_first_token_seconds_count 3"));
        assert!(text.contains("dsv2:request_success_total{finished_reason=\"stop\"} 1"));
        assert!(text.contains("dsv2:request_success_total{finished_reason=\"length\"} 0"));
        assert!(text.contains("dsv2:kv_cache_usage_perc 0"));
    }
}
