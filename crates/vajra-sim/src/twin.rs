//! `vajra-sim twin`: the simulator fed an engine's measured step times makes the engine's exact
//! batches, or says where and why it does not.
//!
//! Inputs: the engine's run folder (`vajra-engine serve --run-dir`: `requests.csv`, whose
//! `arrival_s` is when each request reached the engine, on the clock of the step log), its
//! step log (`serve --steps-log`) and the experiment it served (`serve --experiment`: the
//! scheduler and cache). The simulated run replays the same requests at the same arrival
//! times with the same prompt and output lengths, and ends its step k where the engine began
//! step k + 1 (the last where the engine's ended), so every arrival falls on the same side of
//! every step boundary as in the engine. The shared scheduler then has to form the same steps:
//! the same requests in the same order with the same new tokens and context, which includes
//! the same preemptions (a recomputed request comes back at context 0) and the same finish
//! order (a finished request leaves the next step).
//!
//! Requests are known to the simulator by their lengths only, so prefix-cache hits between
//! different requests are not reproduced (a request's hits on its own blocks after a
//! preemption are): twin an engine run whose prompts share no full block, or with prefix
//! caching off.

use crate::error::SimError;
use std::fmt::Write as _;
use std::path::Path;
use vajra_core::time::Timestamp;
use vajra_metrics::steplog::{self, StepItem, StepLogRow};

fn err(path: &Path, message: impl Into<String>) -> SimError {
    SimError::Experiment {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// One request as the engine served it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EngineRequest {
    /// When it reached the engine, s since the engine was built.
    pub arrival_s: f64,
    /// Prompt tokens.
    pub prompt: u32,
    /// Output tokens it generated.
    pub output: u32,
}

/// Reads the engine's `requests.csv` (every request it finished, by arrival).
///
/// # Errors
/// A missing file or column, a malformed cell, or a request that did not finish normally
/// (aborted or rejected requests cannot be replayed by length).
pub fn read_engine_requests(run_dir: &Path) -> Result<Vec<EngineRequest>, SimError> {
    let path = run_dir.join("requests.csv");
    let names = [
        "arrival_s",
        "prompt_tokens",
        "output_tokens",
        "finish_reason",
    ];
    let (mut rdr, c) = crate::vllm::open_requests_csv(&path, &names)?;
    let why = c[3];
    let mut v = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| err(&path, e.to_string()))?;
        // The `j`-th of `names`, as a number.
        let num = |j: usize| -> Result<f64, SimError> {
            rec.get(c[j])
                .and_then(|x| x.parse::<f64>().ok())
                .ok_or_else(|| {
                    err(
                        &path,
                        format!("line {}: column `{}` is not a number", i + 2, names[j]),
                    )
                })
        };
        let reason = rec.get(why).unwrap_or("");
        if !matches!(reason, "length" | "stop") {
            return Err(err(
                &path,
                format!(
                    "line {}: finish_reason `{reason}`: only requests that ran to their end (length or stop) can be replayed",
                    i + 2
                ),
            ));
        }
        v.push(EngineRequest {
            arrival_s: num(0)?,
            prompt: num(1)? as u32,
            output: num(2)? as u32,
        });
    }
    if v.is_empty() {
        return Err(err(&path, "no requests"));
    }
    v.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(v)
}

/// Where the two runs part.
#[derive(Debug, Clone, PartialEq)]
pub struct Divergence {
    /// Step index (0-based, in the engine's order).
    pub step: usize,
    /// The engine's step (empty past its last).
    pub engine: Vec<StepItem>,
    /// The simulated step (empty past its last).
    pub simulated: Vec<StepItem>,
    /// The likely cause.
    pub why: String,
}

/// The comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinReport {
    /// Steps the engine ran.
    pub engine_steps: usize,
    /// Steps the simulator ran.
    pub simulated_steps: usize,
    /// Steps identical before the first divergence (all of them when there is none).
    pub identical: usize,
    /// The first step where they differ.
    pub divergence: Option<Divergence>,
}

impl TwinReport {
    /// A human summary: the verdict and, at a divergence, both steps side by side.
    pub fn text(&self) -> String {
        let mut s = String::new();
        match &self.divergence {
            None => {
                let _ = writeln!(
                    s,
                    "identical: all {} steps of the engine, batch for batch (requests, new tokens, context, sampling)",
                    self.engine_steps
                );
            }
            Some(d) => {
                let _ = writeln!(
                    s,
                    "diverged at step {} of {} (engine) / {} (simulated); {} steps identical before it",
                    d.step, self.engine_steps, self.simulated_steps, self.identical
                );
                let fmt = |v: &[StepItem]| -> String {
                    if v.is_empty() {
                        return "(no step)".into();
                    }
                    v.iter()
                        .map(|i| {
                            format!(
                                "{}@{}{}",
                                i.tokens,
                                i.context,
                                if i.samples { "*" } else { "" }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                };
                let _ = writeln!(s, "  engine:    {}", fmt(&d.engine));
                let _ = writeln!(s, "  simulated: {}", fmt(&d.simulated));
                let _ = writeln!(s, "  why: {}", d.why);
            }
        }
        s
    }
}

/// Each engine step's (start, end) on the simulator's clock (0 = the first arrival): it
/// starts where the engine began it and ends where the engine began the next (the last, at its
/// own end).
pub fn step_times(steps: &[StepLogRow], t0_s: f64) -> Vec<(Timestamp, Timestamp)> {
    let at = |s: f64| Timestamp::from_secs_f64((s - t0_s).max(0.0));
    (0..steps.len())
        .map(|k| {
            let end_s = match steps.get(k + 1) {
                Some(next) => next.start_s,
                None => steps[k].start_s + steps[k].step_ms / 1e3,
            };
            (at(steps[k].start_s), at(end_s))
        })
        .collect()
}

/// Compares the engine's steps with the simulated ones.
pub fn compare(
    engine: &[StepLogRow],
    simulated: &[Vec<(u32, u32, bool)>],
    requests: &[EngineRequest],
) -> TwinReport {
    let sim: Vec<Vec<StepItem>> = simulated
        .iter()
        .map(|s| {
            s.iter()
                .map(|&(tokens, context, samples)| StepItem {
                    tokens,
                    context,
                    samples,
                })
                .collect()
        })
        .collect();
    let n = engine.len().max(sim.len());
    for k in 0..n {
        let e: &[StepItem] = engine.get(k).map_or(&[], |r| &r.requests);
        let s: &[StepItem] = sim.get(k).map_or(&[], Vec::as_slice);
        if e == s {
            continue;
        }
        let why = if k >= engine.len() {
            "the simulator ran steps past the engine's last (the engine log was cut, or requests the run folder lacks)".into()
        } else if k >= sim.len() {
            "the simulator finished before the engine's last step (a request the run folder does not list, or different output lengths)".into()
        } else {
            // The replay puts every arrival on the engine's side of every step start, up to
            // the logs' nanosecond rounding.
            let start = engine[k].start_s;
            let near = requests
                .iter()
                .map(|r| (start - r.arrival_s).abs())
                .fold(f64::INFINITY, f64::min);
            if near < 1e-6 {
                format!(
                    "arrival jitter: a request arrived {:.0} ns from the engine's start of this step, within the logs' rounding",
                    near * 1e9
                )
            } else {
                "a scheduling decision differs with the same inputs: check that the experiment is the one served (policy, max_num_seqs, cache, --num-blocks); otherwise a bug, or a decision that depends on time".into()
            }
        };
        return TwinReport {
            engine_steps: engine.len(),
            simulated_steps: sim.len(),
            identical: k,
            divergence: Some(Divergence {
                step: k,
                engine: e.to_vec(),
                simulated: s.to_vec(),
                why,
            }),
        };
    }
    TwinReport {
        engine_steps: engine.len(),
        simulated_steps: sim.len(),
        identical: n,
        divergence: None,
    }
}

/// Replays the engine run at `run_dir` (with its step log `steps_log`) in the simulator under
/// the experiment `experiment` with `num_blocks` KV blocks (default: the experiment's
/// `cache.num_blocks`), writing the replayed experiment and its trace into `out`; `policy`
/// replaces the experiment's batching policy (an out-of-tree one).
///
/// # Errors
/// Unreadable inputs, an experiment with a sweep, no block count, or a stalled simulation.
pub fn twin(
    experiment: &Path,
    run_dir: &Path,
    steps_log: &Path,
    num_blocks: Option<u32>,
    out: &Path,
    policy: Option<&crate::sim::PolicyFactory>,
) -> Result<TwinReport, SimError> {
    let steps = steplog::read(steps_log).map_err(|e| err(steps_log, e.to_string()))?;
    if steps.is_empty() {
        return Err(err(steps_log, "no steps"));
    }
    let requests = read_engine_requests(run_dir)?;
    std::fs::create_dir_all(out).map_err(crate::error::write_err(out))?;
    // The requests as a trace (times from the first arrival, as traces are read).
    let trace = out.join("twin_trace.csv");
    let mut text = String::from("arrived_at,num_prefill_tokens,num_decode_tokens\n");
    let t0 = requests[0].arrival_s;
    for r in &requests {
        let _ = writeln!(text, "{:.9},{},{}", r.arrival_s - t0, r.prompt, r.output);
    }
    std::fs::write(&trace, text).map_err(crate::error::write_err(&trace))?;
    // The served experiment, with the trace as its workload and the engine's pool.
    let src = std::fs::read_to_string(experiment).map_err(|e| err(experiment, e.to_string()))?;
    let mut table: toml::Table = src
        .parse()
        .map_err(|e: toml::de::Error| err(experiment, e.to_string()))?;
    if table.contains_key("sweep") {
        return Err(err(
            experiment,
            "has a [sweep]: pass the served point's config.resolved.toml",
        ));
    }
    let mut workload = toml::Table::new();
    let mut arrival = toml::Table::new();
    arrival.insert("type".into(), "trace".into());
    arrival.insert("format".into(), "vidur_csv".into());
    arrival.insert("path".into(), "twin_trace.csv".into());
    workload.insert("arrival".into(), arrival.into());
    table.insert("workload".into(), workload.into());
    table.remove("output");
    let cache = table
        .entry("cache")
        .or_insert_with(|| toml::Table::new().into())
        .as_table_mut()
        .ok_or_else(|| err(experiment, "`cache` is not a table"))?;
    match num_blocks {
        Some(n) => {
            cache.insert("num_blocks".into(), i64::from(n).into());
        }
        None if cache.contains_key("num_blocks") => {}
        None => {
            return Err(err(
                experiment,
                "no cache.num_blocks: pass --num-blocks with the engine's pool (its startup line prints it)",
            ));
        }
    }
    // A model path in the file is relative to it; the replayed copy lives in `out`.
    let base = experiment.parent().unwrap_or(Path::new("."));
    if let Some(m) = table.get_mut("model").and_then(|m| m.as_table_mut())
        && let Some(toml::Value::String(c)) = m.get_mut("config")
        && Path::new(c.as_str()).is_relative()
    {
        *c = std::fs::canonicalize(base.join(&*c))
            .unwrap_or_else(|_| base.join(&*c))
            .display()
            .to_string();
    }
    let replayed = out.join("twin.toml");
    std::fs::write(
        &replayed,
        toml::to_string(&table).map_err(|e| err(&replayed, e.to_string()))?,
    )
    .map_err(crate::error::write_err(&replayed))?;
    let file = vajra_experiment::experiment::ExperimentFile::load(&replayed)?;
    let point = &file.points[0];
    let prep = crate::run::prepare(&file, point)?;
    let times = step_times(&steps, t0);
    let res = crate::run::simulate_replay(&file, point, &prep, &times, policy)?;
    Ok(compare(&steps, &res.steps, &requests))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(start_s: f64, items: &[(u32, u32, bool)]) -> StepLogRow {
        StepLogRow {
            step: 0,
            start_s,
            step_ms: 1.0,
            forward_ms: 1.0,
            requests: items
                .iter()
                .map(|&(tokens, context, samples)| StepItem {
                    tokens,
                    context,
                    samples,
                })
                .collect(),
        }
    }

    #[test]
    fn the_first_differing_step_is_reported_with_its_likely_cause() {
        let engine = [
            row(0.0, &[(8, 0, true)]),
            row(0.01, &[(1, 8, true), (4, 0, true)]),
        ];
        let same = vec![vec![(8, 0, true)], vec![(1, 8, true), (4, 0, true)]];
        let reqs = [
            EngineRequest {
                arrival_s: 0.0,
                prompt: 8,
                output: 2,
            },
            EngineRequest {
                arrival_s: 0.0099999995,
                prompt: 4,
                output: 1,
            },
        ];
        let r = compare(&engine, &same, &reqs);
        assert_eq!((r.identical, r.divergence.is_none()), (2, true));
        // The second request left out of step 1: it arrived 0.5 ns before the step began.
        let late = vec![vec![(8, 0, true)], vec![(1, 8, true)]];
        let r = compare(&engine, &late, &reqs);
        let d = r.divergence.clone().unwrap();
        assert_eq!((d.step, r.identical), (1, 1));
        assert!(d.why.contains("arrival jitter"), "{}", d.why);
        let far = [
            reqs[0],
            EngineRequest {
                arrival_s: 0.005,
                ..reqs[1]
            },
        ];
        let d = compare(&engine, &late, &far).divergence.unwrap();
        assert!(d.why.contains("decision differs"), "{}", d.why);
        let short = vec![vec![(8, 0, true)]];
        let d = compare(&engine, &short, &reqs).divergence.unwrap();
        assert!(d.why.contains("finished before"), "{}", d.why);
        assert!(r.text().contains("diverged at step 1"));
    }

    #[test]
    fn each_step_ends_where_the_engine_began_the_next() {
        let engine = [row(1.0, &[]), row(1.5, &[]), row(2.0, &[])];
        let t = |s: f64| Timestamp::from_secs_f64(s);
        assert_eq!(
            step_times(&engine, 0.5),
            vec![(t(0.5), t(1.0)), (t(1.0), t(1.5)), (t(1.5), t(1.501))]
        );
    }
}
