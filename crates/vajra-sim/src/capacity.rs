//! Capacity search: the highest request rate (or, for a closed loop, the most concurrent
//! clients) a configuration sustains under its run-level SLOs (`slo.p99_ttft_s`,
//! `slo.p99_tbt_s`, `slo.p50_scheduling_delay_s`, `slo.max_deadline_miss_rate`), in-process and
//! in parallel.
//!
//! A probe simulates the point at one load (`workload.arrival.qps`, or
//! `workload.arrival.clients` rounded to a whole client) without writing files and
//! passes when every limit is met and every request completed. The search first brackets the
//! capacity by doubling (or halving) the experiment's own rate, `k` probes at a time, then
//! narrows the bracket by probing `k` evenly spaced rates inside it per round, until it is
//! narrower than `capacity.precision` of the passing rate; `k` is the number of worker
//! threads (at least 2). Every probe is deterministic, so the answer is too. Latency is assumed
//! to grow with load (a probe that passes above a failing one is ignored).

use crate::error::{Result, SimError};
use crate::run::{Prepared, prepare, simulate, summarize};
use rayon::prelude::*;
use serde::Serialize;
use vajra_experiment::experiment::{ExperimentFile, Point};
use vajra_workload::config::ArrivalConfig;

/// One probe.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Rate (requests/s).
    pub qps: f64,
    /// Every limit met and every request completed.
    pub met: bool,
    /// Each limit's measured value.
    pub values: Vec<(String, f64)>,
    /// Per SLO class at this rate (runs that define `[[slo.classes]]`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ClassAtRate>,
}

/// One SLO class's service at a probed rate.
#[derive(Debug, Clone, Serialize)]
pub struct ClassAtRate {
    /// Class name.
    pub name: String,
    /// Good requests of the class per second.
    pub goodput_rps: f64,
    /// Fraction of the class's requests meeting its targets.
    pub attainment: f64,
}

/// The answer for one point.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// Point label (empty without a sweep).
    pub point: String,
    /// Highest passing rate found (`None`: even `capacity.min_qps` fails).
    pub capacity_qps: Option<f64>,
    /// Lowest failing rate found above it (`None`: `capacity.max_qps` passes).
    pub failing_qps: Option<f64>,
    /// Devices in the cluster.
    pub devices: u32,
    /// Cluster price per hour (US dollars).
    pub price_per_hour: f64,
    /// Capacity per dollar-hour (requests/s per $/h).
    pub qps_per_dollar_hour: Option<f64>,
    /// Every probe, by rate.
    pub probes: Vec<Probe>,
}

/// The points of a file that differ in more than their load: a sweep over
/// `workload.arrival.qps` (or `clients`) would only restart the same search from another rate,
/// so each configuration is searched once (from its first point's rate) and labelled without
/// the load.
pub fn distinct_configs(points: &[Point]) -> Vec<Point> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in points {
        let key = toml::to_string(&with_qps(p, 1.0).experiment).unwrap_or_default();
        if seen.insert(key) {
            let mut q = p.clone();
            q.label = p
                .label
                .split(',')
                .filter(|part| !part.starts_with("qps=") && !part.starts_with("clients="))
                .collect::<Vec<_>>()
                .join(",");
            out.push(q);
        }
    }
    out
}

/// `vajra-sim capacity --pd-split N`: every point with `cluster.pools` becomes `N − 1` points,
/// one per split of `N` replicas into a prefill and a decode pool (`1P(N−1)D` … `(N−1)P1D`),
/// labelled `<P>P<D>D` (in place of the file's split when the label names it, else as
/// `pd=<P>P<D>D`); points without pools stay as they are (the colocated
/// baselines of the same file), so one search ranks every P:D ratio at a replica count.
///
/// # Errors
/// `N` below 2, or no point with `cluster.pools`.
pub fn pd_splits(points: &[Point], n: u32) -> Result<Vec<Point>> {
    if n < 2 {
        return Err(SimError::invalid(
            "--pd-split",
            n,
            "replicas ≥ 2 to split into a prefill and a decode pool",
        ));
    }
    if points.iter().all(|p| p.experiment.cluster.pools.is_empty()) {
        return Err(SimError::invalid(
            "--pd-split",
            n,
            "a file whose points (or some of them) set cluster.pools",
        ));
    }
    let mut out = Vec::new();
    for p in points {
        if p.experiment.cluster.pools.is_empty() {
            out.push(p.clone());
            continue;
        }
        let count = |role| {
            p.experiment
                .cluster
                .pools
                .iter()
                .filter(|x| x.role == role)
                .map(|x| x.num_replicas)
                .sum::<u32>()
        };
        let own = format!(
            "{}P{}D",
            count(vajra_core::config::InstanceRole::Prefill),
            count(vajra_core::config::InstanceRole::Decode)
        );
        for prefill in 1..n {
            let mut q = p.clone();
            for pool in &mut q.experiment.cluster.pools {
                pool.num_replicas = match pool.role {
                    vajra_core::config::InstanceRole::Prefill => prefill,
                    _ => n - prefill,
                };
            }
            let split = format!("{prefill}P{}D", n - prefill);
            // A sweep label names the file's split (`cluster=1P1D-...`): name this one instead.
            q.label = if p.label.contains(&own) {
                p.label.replacen(&own, &split, 1)
            } else if p.label.is_empty() {
                format!("pd={split}")
            } else {
                format!("{},pd={split}", p.label)
            };
            out.push(q);
        }
    }
    Ok(out)
}

fn with_qps(point: &Point, qps: f64) -> Point {
    let mut p = point.clone();
    match &mut p.experiment.workload.arrival {
        ArrivalConfig::Poisson { qps: q, .. }
        | ArrivalConfig::Gamma { qps: q, .. }
        | ArrivalConfig::Constant { qps: q } => *q = qps,
        ArrivalConfig::ClosedLoop { clients, .. } => *clients = qps.round().max(1.0) as u32,
        ArrivalConfig::Sessions(c) => c.qps = qps,
        ArrivalConfig::AllAtOnce | ArrivalConfig::Trace(_) => {}
    }
    p
}

/// One probe. `prep` (predictor, memory plan) does not depend on the load, so a search builds
/// it once for all its probes.
fn probe(file: &ExperimentFile, point: &Point, prep: &Prepared, qps: f64) -> Result<Probe> {
    let p = with_qps(point, qps);
    let (res, _, _) = simulate(file, &p, prep, None, false, false, None)?;
    let s = summarize(&p, prep, &res);
    Ok(Probe {
        qps,
        met: s.metrics.slo.all_limits_met,
        values: s
            .metrics
            .slo
            .limits
            .iter()
            .map(|l| (l.metric.clone(), l.value))
            .collect(),
        classes: s
            .metrics
            .classes
            .iter()
            .map(|c| ClassAtRate {
                name: c.name.clone(),
                goodput_rps: c.goodput_rps,
                attainment: c.attainment,
            })
            .collect(),
    })
}

/// Searches one point.
///
/// # Errors
/// An arrival process without a rate, no run-level SLO, or a failing probe.
pub fn search(file: &ExperimentFile, point: &Point) -> Result<Capacity> {
    let e = &point.experiment;
    let integer = matches!(e.workload.arrival, ArrivalConfig::ClosedLoop { .. });
    let start = match e.workload.arrival {
        ArrivalConfig::Poisson { qps, .. }
        | ArrivalConfig::Gamma { qps, .. }
        | ArrivalConfig::Constant { qps } => qps,
        ArrivalConfig::ClosedLoop { clients, .. } => f64::from(clients),
        ArrivalConfig::Sessions(ref c) => c.qps,
        ref other => {
            let kind = serde_json::to_value(other)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str().map(str::to_owned)))
                .unwrap_or_default();
            return Err(SimError::invalid(
                "workload.arrival.type",
                kind,
                "poisson, gamma or constant (capacity search varies workload.arrival.qps) or closed_loop (it varies workload.arrival.clients)",
            ));
        }
    };
    let slo = &e.slo;
    if slo.p99_ttft_s.is_none()
        && slo.p99_tbt_s.is_none()
        && slo.p50_scheduling_delay_s.is_none()
        && slo.max_deadline_miss_rate.is_none()
    {
        return Err(SimError::invalid(
            "slo",
            "(no run-level limit)",
            "at least one of slo.p99_ttft_s, slo.p99_tbt_s, slo.p50_scheduling_delay_s, slo.max_deadline_miss_rate",
        ));
    }
    let cfg = e.capacity;
    let prep = prepare(file, point)?;
    let k = rayon::current_num_threads().max(2);
    let mut probes: Vec<Probe> = Vec::new();
    let mut run = |rates: Vec<f64>| -> Result<Vec<Probe>> {
        let got: Vec<Result<Probe>> = rates
            .par_iter()
            .map(|&q| probe(file, point, &prep, q))
            .collect();
        let got: Vec<Probe> = got.into_iter().collect::<Result<_>>()?;
        probes.extend(got.iter().cloned());
        Ok(got)
    };
    let (mut lo, mut hi): (Option<f64>, Option<f64>) = (None, None);
    // Bracket: upward from the experiment's rate.
    let mut q = start.clamp(cfg.min_qps, cfg.max_qps);
    'up: loop {
        let rates: Vec<f64> = (0..k)
            .map(|j| q * f64::powi(2.0, j as i32))
            .take_while(|&r| r <= cfg.max_qps)
            .collect();
        if rates.is_empty() {
            break;
        }
        let last = rates[rates.len() - 1];
        for p in run(rates)? {
            if p.met {
                lo = Some(p.qps);
            } else {
                hi = Some(p.qps);
                break 'up;
            }
        }
        if lo.is_none() {
            break;
        }
        q = last * 2.0;
    }
    // Nothing passed at the start: downward.
    let min = if integer { 1.0 } else { cfg.min_qps };
    if lo.is_none() {
        let mut q = start.min(hi.unwrap_or(start));
        'down: loop {
            let mut rates: Vec<f64> = (1..=k)
                .map(|j| q / f64::powi(2.0, j as i32))
                .map(|r| if integer { r.floor() } else { r })
                .take_while(|&r| r >= min)
                .collect();
            rates.dedup();
            if rates.is_empty() {
                break;
            }
            let last = rates[rates.len() - 1];
            for p in run(rates)? {
                if p.met {
                    lo = Some(p.qps);
                    break 'down;
                }
                hi = Some(p.qps);
            }
            q = last;
        }
    }
    // Narrow.
    while let (Some(l), Some(h)) = (lo, hi) {
        if h / l - 1.0 <= cfg.precision || (integer && h - l <= 1.0) {
            break;
        }
        let mut rates: Vec<f64> = (1..=k)
            .map(|i| l + (h - l) * i as f64 / (k + 1) as f64)
            .map(|r| if integer { r.round() } else { r })
            .filter(|&r| r > l && r < h)
            .collect();
        rates.dedup();
        if rates.is_empty() {
            break;
        }
        for p in run(rates)? {
            if p.met {
                lo = Some(p.qps);
            } else {
                hi = Some(p.qps);
                break;
            }
        }
    }
    probes.sort_by(|a, b| a.qps.total_cmp(&b.qps));
    let devices = prep.setup.num_devices;
    let price = prep.setup.price_per_hour;
    Ok(Capacity {
        point: point.label.clone(),
        capacity_qps: lo,
        failing_qps: hi,
        devices,
        price_per_hour: price,
        qps_per_dollar_hour: lo.filter(|_| price > 0.0).map(|l| l / price),
        probes,
    })
}

/// A Markdown table of capacities.
pub fn table(caps: &[Capacity]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "| point | capacity (req/s, or clients for a closed loop) | first failing | devices | $/h | capacity per $/h | probes |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let f = |x: Option<f64>| x.map_or_else(|| "–".to_owned(), |v| format!("{v:.3}"));
    let label = |c: &Capacity| {
        if c.point.is_empty() {
            "(single point)".to_owned()
        } else {
            c.point.clone()
        }
    };
    for c in caps {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {} | {} |",
            label(c),
            f(c.capacity_qps),
            f(c.failing_qps),
            c.devices,
            c.price_per_hour,
            f(c.qps_per_dollar_hour),
            c.probes.len()
        );
    }
    // Each class's goodput and attainment at the capacity found.
    fn at_capacity(c: &Capacity) -> Option<&Probe> {
        let cap = c.capacity_qps?;
        c.probes.iter().find(|p| p.qps == cap)
    }
    if caps
        .iter()
        .any(|c| at_capacity(c).is_some_and(|p| !p.classes.is_empty()))
    {
        s.push_str("\nAt capacity, per SLO class:\n\n| point | class | goodput (req/s) | attainment |\n|---|---|---:|---:|\n");
        for c in caps {
            for k in at_capacity(c).map_or(&[][..], |p| &p.classes) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.3} | {:.3} |",
                    label(c),
                    k.name,
                    k.goodput_rps,
                    k.attainment
                );
            }
        }
    }
    s
}

/// The Pareto chart of a sweep's capacities: capacity per dollar-hour against the latency
/// measured at capacity (the first run-level limit), one marker per configuration, and the
/// Pareto front (more capacity per dollar and lower latency) as a line. Writes
/// `capacity_pareto.{png,svg}` into `dir`; nothing for fewer than two configurations.
///
/// # Errors
/// The images cannot be written.
pub fn pareto_chart(caps: &[Capacity], dir: &std::path::Path) -> Result<()> {
    let pts: Vec<(String, f64, f64, String)> = caps
        .iter()
        .filter_map(|c| {
            let cap = c.capacity_qps?;
            let per_dollar = c.qps_per_dollar_hour?;
            let probe = c.probes.iter().find(|p| p.qps == cap)?;
            let (metric, v) = probe.values.first()?;
            Some((c.point.clone(), per_dollar, *v, metric.clone()))
        })
        .collect();
    if pts.len() < 2 {
        return Ok(());
    }
    // Front: sorted by capacity per dollar, descending; keep points with a lower latency than
    // every point offering more capacity per dollar.
    let mut sorted = pts.clone();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut front = Vec::new();
    let mut best = f64::INFINITY;
    for p in &sorted {
        if p.2 < best {
            best = p.2;
            front.push((p.1, p.2));
        }
    }
    front.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The front first, so every configuration's marker is drawn on top of it.
    let mut series: Vec<(String, Vec<(f64, f64)>)> = vec![("Pareto front".into(), front)];
    series.extend(pts.iter().map(|p| (p.0.clone(), vec![(p.1, p.2)])));
    crate::report::render(
        &crate::report::Chart {
            file: "capacity_pareto",
            title: "Capacity per dollar against latency at capacity".into(),
            x: "capacity per dollar-hour ((requests/s) per $/h)".into(),
            y: format!("{} at capacity (s)", pts[0].3),
            log_x: false,
            log_y: false,
            series,
            points: true,
        },
        dir,
    )?;
    Ok(())
}
