//! Plugin histograms: Prometheus histograms that workers fill locally and add to the shared
//! counts once per turn of their event loop.
//!
//! `prometheus`'s own histogram finds a value's bucket by a linear scan on each observation,
//! and a worker's local copy of it can only be flushed one observation at a time into the
//! shared one. A traffic metric is observed for every reply, and the replies of a pipeline
//! mostly carry the same value (the same latency, the same size), so here a local histogram
//! remembers the last value's bucket, and flushing adds bucket counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

/// Counts of one histogram series.
#[derive(Default)]
struct Counts {
    /// Per bucket (not cumulative); a value above the last bound is in none of them.
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
}

/// One series of a plugin histogram, shared by every worker.
pub struct SharedHistogram {
    bounds: Arc<[f64]>,
    counts: Mutex<Counts>,
}

/// The bucket of `v`: the first whose upper bound is at least `v` (`bounds.len()`: above all).
fn bucket_of(bounds: &[f64], v: f64) -> usize {
    bounds.partition_point(|b| *b < v)
}

impl SharedHistogram {
    fn new(bounds: Arc<[f64]>) -> SharedHistogram {
        SharedHistogram {
            counts: Mutex::new(Counts {
                buckets: vec![0; bounds.len()],
                count: 0,
                sum: 0.0,
            }),
            bounds,
        }
    }

    /// Observes one value now.
    pub fn observe(&self, v: f64) {
        let i = bucket_of(&self.bounds, v);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = c.buckets.get_mut(i) {
            *b += 1;
        }
        c.count += 1;
        c.sum += v;
    }

    /// A worker's copy: observations stay in it until [`LocalHistogram::flush`].
    pub fn local(self: &Arc<Self>) -> LocalHistogram {
        LocalHistogram {
            shared: self.clone(),
            buckets: vec![0; self.bounds.len()],
            count: 0,
            sum: 0.0,
            last: f64::NAN,
            last_bucket: 0,
        }
    }

    /// (count, sum, cumulative count per bound).
    fn snapshot(&self) -> (u64, f64, Vec<(f64, u64)>) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = 0;
        let cumulative = self
            .bounds
            .iter()
            .zip(&c.buckets)
            .map(|(b, n)| {
                total += n;
                (*b, total)
            })
            .collect();
        (c.count, c.sum, cumulative)
    }
}

/// A worker's copy of a [`SharedHistogram`].
pub struct LocalHistogram {
    shared: Arc<SharedHistogram>,
    buckets: Vec<u64>,
    count: u64,
    sum: f64,
    /// The last value observed and its bucket (NaN: none yet).
    last: f64,
    last_bucket: usize,
}

impl LocalHistogram {
    /// Observes a value (finite: callers check).
    #[inline]
    pub fn observe(&mut self, v: f64) {
        self.observe_n(v, 1);
    }

    /// Observes a value `n` times.
    #[inline]
    pub fn observe_n(&mut self, v: f64, n: u64) {
        if v != self.last {
            self.last = v;
            self.last_bucket = bucket_of(&self.shared.bounds, v);
        }
        if let Some(b) = self.buckets.get_mut(self.last_bucket) {
            *b += n;
        }
        self.count += n;
        self.sum += v * n as f64;
    }

    /// Adds what was observed since the last flush to the shared counts.
    pub fn flush(&mut self) {
        if self.count == 0 {
            return;
        }
        let mut c = self.shared.counts.lock().unwrap_or_else(|p| p.into_inner());
        for (to, from) in c.buckets.iter_mut().zip(&mut self.buckets) {
            *to += std::mem::take(from);
        }
        c.count += std::mem::take(&mut self.count);
        c.sum += std::mem::take(&mut self.sum);
    }
}

/// A plugin histogram metric: its series by label values, collected for the registry.
#[derive(Clone)]
pub struct HistogramFamily {
    inner: Arc<Family>,
}

struct Family {
    desc: Desc,
    bounds: Arc<[f64]>,
    series: Mutex<HashMap<Vec<String>, Arc<SharedHistogram>>>,
}

impl HistogramFamily {
    /// A family named `name` with these label names and bucket bounds (strictly increasing;
    /// a last bound of +Inf is implied and dropped; none: `default`).
    pub fn new(
        name: &str,
        help: &str,
        labels: &[String],
        bounds: &[f64],
        default: &[f64],
    ) -> Result<HistogramFamily, String> {
        let mut bounds = if bounds.is_empty() {
            default.to_vec()
        } else {
            bounds.to_vec()
        };
        // NaN is in order with nothing.
        if let Some(w) = bounds
            .windows(2)
            .find(|w| w[0].partial_cmp(&w[1]) != Some(std::cmp::Ordering::Less))
        {
            return Err(format!(
                "histogram buckets must be in increasing order: {} >= {}",
                w[0], w[1]
            ));
        }
        if bounds.last() == Some(&f64::INFINITY) {
            bounds.pop();
        }
        let desc = Desc::new(
            name.to_string(),
            help.to_string(),
            labels.to_vec(),
            HashMap::new(),
        )
        .map_err(|e| e.to_string())?;
        Ok(HistogramFamily {
            inner: Arc::new(Family {
                desc,
                bounds: bounds.into(),
                series: Mutex::default(),
            }),
        })
    }

    /// The series with these label values (as many as the family has labels), made when new.
    pub fn series(&self, labels: &[String]) -> Arc<SharedHistogram> {
        let mut series = self.inner.series.lock().unwrap_or_else(|p| p.into_inner());
        series
            .entry(labels.to_vec())
            .or_insert_with(|| Arc::new(SharedHistogram::new(self.inner.bounds.clone())))
            .clone()
    }
}

impl Collector for HistogramFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.inner.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let desc = &self.inner.desc;
        let series: Vec<(Vec<String>, Arc<SharedHistogram>)> = {
            let s = self.inner.series.lock().unwrap_or_else(|p| p.into_inner());
            s.iter().map(|(l, h)| (l.clone(), h.clone())).collect()
        };
        let mut mf = MetricFamily::default();
        mf.set_name(desc.fq_name.clone());
        mf.set_help(desc.help.clone());
        mf.set_field_type(MetricType::HISTOGRAM);
        for (values, h) in series {
            let mut labels: Vec<proto::LabelPair> = desc
                .variable_labels
                .iter()
                .zip(values)
                .map(|(name, value)| {
                    let mut p = proto::LabelPair::default();
                    p.set_name(name.clone());
                    p.set_value(value);
                    p
                })
                .collect();
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            let (count, sum, cumulative) = h.snapshot();
            let mut ph = proto::Histogram::default();
            ph.set_sample_count(count);
            ph.set_sample_sum(sum);
            ph.set_bucket(
                cumulative
                    .into_iter()
                    .map(|(bound, n)| {
                        let mut b = proto::Bucket::default();
                        b.set_upper_bound(bound);
                        b.set_cumulative_count(n);
                        b
                    })
                    .collect(),
            );
            let mut m = proto::Metric::default();
            m.set_label(labels);
            m.set_histogram(ph);
            mf.mut_metric().push(m);
        }
        vec![mf]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn text(f: &HistogramFamily) -> String {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &f.collect(), &mut buf)
            .unwrap_or_default();
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[test]
    fn buckets_are_found_and_flushed_as_prometheus_counts_them() {
        let f = HistogramFamily::new(
            "t_seconds",
            "help",
            &["command".to_string()],
            &[0.1, 1.0, f64::INFINITY],
            &[],
        )
        .unwrap();
        let shared = f.series(&["get".to_string()]);
        let mut local = shared.local();
        for v in [0.05, 0.5, 2.0, 0.05] {
            local.observe(v);
        }
        local.observe_n(0.1, 2);
        // Nothing is visible before the flush.
        assert!(text(&f).contains("t_seconds_count{command=\"get\"} 0"));
        local.flush();
        shared.observe(1.0);
        let t = text(&f);
        for line in [
            "t_seconds_bucket{command=\"get\",le=\"0.1\"} 4",
            "t_seconds_bucket{command=\"get\",le=\"1\"} 6",
            "t_seconds_bucket{command=\"get\",le=\"+Inf\"} 7",
            "t_seconds_sum{command=\"get\"} 3.8",
            "t_seconds_count{command=\"get\"} 7",
        ] {
            assert!(t.contains(line), "{line} not in\n{t}");
        }
        // A second flush adds only what came since.
        local.observe(0.5);
        local.flush();
        local.flush();
        assert!(text(&f).contains("t_seconds_count{command=\"get\"} 8"));
    }

    #[test]
    fn bounds_must_increase() {
        let e = HistogramFamily::new("t", "help", &[], &[1.0, 1.0], &[]).err();
        assert!(e.is_some_and(|e| e.contains("increasing")));
        let e = HistogramFamily::new("t", "help", &[], &[1.0, f64::NAN], &[]).err();
        assert!(e.is_some());
        assert!(HistogramFamily::new("bad name", "help", &[], &[], &[1.0]).is_err());
    }
}
