//! Running one point of an experiment and writing its run folder.

use crate::error::{Result, write_err};
use crate::memory::{self, MemoryPlan};
use crate::predictor::{self, Predictor};
use crate::sim::{self, SimSpec, StageSlice};
use rayon::prelude::*;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use vajra_core::config::ModelConfig;
use vajra_experiment::catalog::DeviceSpec;
use vajra_experiment::experiment::{self, ExperimentFile, Point};
use vajra_metrics::Summary;
use vajra_metrics::output::{Tables, write_run};
use vajra_metrics::summary::ClusterFacts;
use vajra_workload::RequestSource;

/// Facts about how a point was set up (in `summary.json` under `setup`).
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Model shape.
    pub model: ModelConfig,
    /// Device.
    pub device: DeviceSpec,
    /// Replicas.
    pub num_replicas: u32,
    /// Tensor-parallel width.
    pub tensor_parallel: u32,
    /// Pipeline stages.
    pub pipeline_parallel: u32,
    /// Memory plan of a replica.
    pub memory: MemoryPlan,
    /// Where the predictor's numbers come from.
    pub predictor: Vec<String>,
    /// Scheduler policy name.
    pub policy: String,
    /// Devices in the cluster (all pools).
    pub num_devices: u32,
    /// The cluster's price per hour (US dollars, all devices).
    pub price_per_hour: f64,
    /// The pools of a disaggregated cluster (the fields above are its prefill pool's).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSetup>,
}

/// One pool of a disaggregated cluster, as set up.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSetup {
    /// `prefill` or `decode`.
    pub role: String,
    /// Replicas.
    pub num_replicas: u32,
    /// Device.
    pub device: String,
    /// Tensor-parallel width.
    pub tensor_parallel: u32,
    /// Pipeline stages.
    pub pipeline_parallel: u32,
    /// KV blocks per replica.
    pub num_blocks: u32,
    /// Where its predictor's numbers come from.
    pub predictor: Vec<String>,
}

/// The decode pool of a disaggregated point and its KV link.
pub struct DecodePool {
    /// Replicas.
    pub num_replicas: u32,
    /// Predictor of a decode replica.
    pub predictor: Predictor,
    /// Memory plan of a decode replica.
    pub memory: MemoryPlan,
    /// Device.
    pub device: DeviceSpec,
    /// Shape.
    pub par: vajra_core::config::ParallelConfig,
    /// The link between a prefill and a decode replica.
    pub link: vajra_experiment::catalog::LinkSpec,
    /// Bytes/s between one prefill and one decode replica (the link's per-GPU rate times the
    /// narrower replica's devices, each GPU sending its own shard).
    pub bandwidth: f64,
    /// Whether transfers overlap the last prefill step layer by layer.
    pub layerwise: bool,
    /// Picks a prefilled request's decode replica.
    pub router: vajra_core::router::RouterConfig,
    /// The scheduler of a decode replica.
    pub scheduler: vajra_core::sched::config::SchedulerConfig,
}

/// `summary.json`.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Experiment name.
    pub name: String,
    /// Sweep label (empty without a sweep).
    pub point: String,
    /// Root seed.
    pub seed: u64,
    /// Setup facts.
    pub setup: Setup,
    /// Simulated time at the last event (s).
    pub simulated_s: f64,
    /// Metrics.
    #[serde(flatten)]
    pub metrics: Summary,
}

/// The result of one point.
#[derive(Debug, Clone)]
pub struct PointResult {
    /// The point's label.
    pub label: String,
    /// Its sweep values.
    pub overrides: Vec<(String, String)>,
    /// Where it was written.
    pub dir: PathBuf,
    /// Its summary.
    pub summary: RunSummary,
    /// Wall time of the event loop (s).
    pub loop_s: f64,
    /// Wall time of the whole point including outputs (s).
    pub wall_s: f64,
    /// Events processed.
    pub events: u64,
    /// Warnings raised while setting it up.
    pub warnings: Vec<String>,
}

/// Everything a point needs before its loop runs.
pub struct Prepared {
    /// The predictor.
    pub predictor: Predictor,
    /// The memory plan.
    pub memory: MemoryPlan,
    /// Setup facts.
    pub setup: Setup,
    /// Largest batch the scheduler can form, in tokens.
    pub max_batch_tokens: u32,
    /// The decode pool of a disaggregated point (the fields above are the prefill pool's).
    pub decode: Option<DecodePool>,
    /// The scheduler of a replica (the prefill pool's, in a disaggregated point).
    pub scheduler: vajra_core::sched::config::SchedulerConfig,
}

impl Prepared {
    /// The shape of a replica (the prefill pool's, in a disaggregated point).
    pub fn parallel(&self) -> vajra_core::config::ParallelConfig {
        vajra_core::config::ParallelConfig {
            tensor_parallel: self.setup.tensor_parallel,
            pipeline_parallel: self.setup.pipeline_parallel,
        }
    }
}

/// Builds the predictor and memory plan of a point.
///
/// # Errors
/// Bad model, device, profile, or a model that does not fit.
pub fn prepare(file: &ExperimentFile, point: &Point) -> Result<Prepared> {
    let e = &point.experiment;
    let base = &file.base;
    let model = experiment::resolve_model(&e.model, base)?;
    let batch_tokens = |sc: &vajra_core::sched::config::SchedulerConfig| {
        sc.policy
            .token_budget()
            .unwrap_or(sc.max_num_seqs.saturating_mul(model.max_model_len))
            .min(1 << 20)
    };
    let views = e.cluster.pool_views();
    // Each pool's scheduler: its own, else the file's.
    let mut schedulers: Vec<vajra_core::sched::config::SchedulerConfig> =
        if e.cluster.pools.is_empty() {
            vec![e.scheduler.clone()]
        } else {
            e.cluster
                .pools
                .iter()
                .map(|p| p.scheduler.clone().unwrap_or_else(|| e.scheduler.clone()))
                .collect()
        };
    let mut shapes = Vec::with_capacity(views.len());
    for ((_, c), sc) in views.iter().zip(&schedulers) {
        shapes.push(prepare_shape(file, e, &model, c, batch_tokens(sc))?);
    }
    let price = |c: &experiment::ClusterSpec, d: &DeviceSpec| {
        f64::from(c.num_replicas * c.tensor_parallel * c.pipeline_parallel) * d.price_per_hour
    };
    let num_devices = views
        .iter()
        .map(|(_, c)| c.num_replicas * c.tensor_parallel * c.pipeline_parallel)
        .sum();
    let price_per_hour = views
        .iter()
        .zip(&shapes)
        .map(|((_, c), sh)| price(c, &sh.2))
        .sum();
    // The prefill pool first, whatever order the file lists the pools in (replicas are
    // numbered so).
    let order: Vec<usize> = if e.cluster.pools.is_empty() {
        vec![0]
    } else {
        let p = views
            .iter()
            .position(|(r, _)| *r == vajra_core::config::InstanceRole::Prefill)
            .expect("validated: a prefill pool");
        vec![p, 1 - p]
    };
    let pools = if e.cluster.pools.is_empty() {
        Vec::new()
    } else {
        order
            .iter()
            .map(|&i| (&views[i], &shapes[i]))
            .map(|((role, c), sh)| PoolSetup {
                role: role.name().to_owned(),
                num_replicas: c.num_replicas,
                device: sh.2.name.clone(),
                tensor_parallel: c.tensor_parallel,
                pipeline_parallel: c.pipeline_parallel,
                num_blocks: sh.1.num_blocks,
                predictor: sh.0.provenance.clone(),
            })
            .collect()
    };
    let mut shapes: Vec<Option<_>> = shapes.into_iter().map(Some).collect();
    let (mut predictor, memory, device, par) = shapes[order[0]].take().expect("a shape");
    let max_batch_tokens = batch_tokens(&schedulers[order[0]]);
    let decode = match order.get(1) {
        None => None,
        Some(&i) => {
            let (dp, dm, dd, dpar) = shapes[i].take().expect("a shape");
            let t = e.cluster.kv_transfer.clone().unwrap_or_default();
            let link = vajra_experiment::catalog::resolve_link(&t)?;
            let width = par.world_size().min(dpar.world_size());
            Some(DecodePool {
                scheduler: schedulers[i].clone(),
                num_replicas: views[i].1.num_replicas,
                predictor: dp,
                memory: dm,
                device: dd,
                par: dpar,
                bandwidth: link.bandwidth * f64::from(width),
                link,
                layerwise: t.layerwise,
                router: e
                    .cluster
                    .decode_router
                    .unwrap_or(vajra_core::router::RouterConfig::LeastKvUsage),
            })
        }
    };
    if let Some(d) = &decode {
        predictor
            .warnings
            .extend(d.predictor.warnings.iter().cloned());
    }
    let setup = Setup {
        model,
        device,
        num_replicas: views[order[0]].1.num_replicas,
        tensor_parallel: par.tensor_parallel,
        pipeline_parallel: par.pipeline_parallel,
        memory,
        predictor: predictor.provenance.clone(),
        policy: schedulers[order[0]].policy.name().to_owned(),
        num_devices,
        price_per_hour,
        pools,
    };
    let scheduler = schedulers.swap_remove(order[0]);
    Ok(Prepared {
        predictor,
        memory,
        setup,
        max_batch_tokens,
        decode,
        scheduler,
    })
}

/// The predictor and memory plan of one replica shape (a cluster, or one of its pools).
fn prepare_shape(
    file: &ExperimentFile,
    e: &experiment::Experiment,
    model: &ModelConfig,
    c: &experiment::ClusterSpec,
    max_batch_tokens: u32,
) -> Result<(
    Predictor,
    MemoryPlan,
    DeviceSpec,
    vajra_core::config::ParallelConfig,
)> {
    let base = &file.base;
    let device = experiment::resolve_device(c, &e.devices)?;
    let par = experiment::parallel(c);
    let memory = memory::plan(model, &device, par, &e.cache, max_batch_tokens.min(1 << 16))?;
    let mut warnings = Vec::new();
    let compute: Option<PathBuf> = match &e.predictor.profile {
        Some(p) if p.as_os_str() == "roofline" => None,
        Some(p) => Some(base.join(p)),
        None => {
            let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
            let roots = [cwd, base.clone(), base.join("..")];
            let found = predictor::find_profile(&roots, &device.name, model);
            if found.is_none() {
                warnings.push(format!(
                    "no profile for {} on {} under profiles/{{measured,generated}}/: using the roofline model (set predictor.profile = \"roofline\" to silence this)",
                    model.name, device.name
                ));
            }
            found
        }
    };
    let network = e.predictor.network.as_ref().map(|p| base.join(p));
    let mut predictor = Predictor::new(
        model,
        &device,
        par,
        &e.predictor,
        compute.as_deref(),
        network.as_deref(),
        max_batch_tokens,
    )?;
    warnings.append(&mut predictor.warnings);
    predictor.warnings = warnings;
    Ok((predictor, memory, device, par))
}

/// Most replica partitions a point is split into (a fixed number, so that outputs do not
/// depend on the machine's core count).
pub const MAX_PARTITIONS: u32 = 8;

/// Output assembly left after a partitioned run's event loops: joining the partitions'
/// `batches.parquet` and `trace.json` parts. It depends on nothing else of the run, so
/// [`run_point`] does it alongside the summary and the request tables.
#[derive(Debug, Default)]
pub struct PendingParts {
    batches: Option<(Vec<PathBuf>, PathBuf, u32)>,
    trace: Option<(PathBuf, u32, u32, Vec<PathBuf>)>,
}

impl PendingParts {
    /// Joins the parts into their files (and deletes the parts).
    ///
    /// # Errors
    /// A part that cannot be read or a file that cannot be written.
    pub fn finish(self) -> Result<()> {
        if let Some((parts, dest, num_blocks)) = self.batches {
            vajra_metrics::output::concat_batch_parts(&parts, &dest, num_blocks)?;
            parts.iter().for_each(|p| crate::cleanup::release(p));
        }
        if let Some((dest, n, pp, parts)) = self.trace {
            TraceWriter::assemble(&dest, n, pp, &parts)?;
            parts.iter().for_each(|p| crate::cleanup::release(p));
        }
        Ok(())
    }
}

/// Runs a point's event loop; with `out`, streams `batches.parquet` and `trace.json` there
/// (for a partitioned run, as parts that the returned [`PendingParts`] joins). Returns the
/// result (the request records, kept only when `out` is given and a request table is
/// asked for, sorted by id) and the loops' wall time.
///
/// # Errors
/// A stalled simulation or a stream that cannot be written.
pub fn simulate(
    file: &ExperimentFile,
    point: &Point,
    prep: &Prepared,
    out: Option<&Path>,
    trace: bool,
    sequential: bool,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<(sim::SimResult, f64, PendingParts)> {
    let e = &point.experiment;
    let disagg = disagg_spec(prep);
    let mut spec = sim_spec(point, prep, progress, None);
    spec.disagg = disagg.as_ref();
    let par = prep.parallel();
    // The trace names a thread per stage of the deepest replica.
    let trace_pp = prep.decode.as_ref().map_or(par.pipeline_parallel, |d| {
        par.pipeline_parallel.max(d.par.pipeline_parallel)
    });
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    }
    let tracing = trace && e.output.trace && out.is_some();
    let parquet = e.output.parquet && out.is_some();
    // Per-request records only for a request table; the summary needs only the outcomes.
    let records = out.is_some() && (e.output.csv || e.output.parquet);
    let collector = |n| {
        let c = vajra_metrics::Collector::new(&e.slo, n);
        if records { c } else { c.without_records() }
    };
    let dir = out.unwrap_or(Path::new("."));
    let n = e.cluster.total_replicas();
    let closed = matches!(
        e.workload.arrival,
        vajra_workload::config::ArrivalConfig::ClosedLoop { .. }
            | vajra_workload::config::ArrivalConfig::Sessions(_)
    );
    let parts = if !sequential
        && n >= 2
        && prep.decode.is_none()
        && sim::partitionable(&e.router, closed)
    {
        n.min(MAX_PARTITIONS)
    } else {
        1
    };
    // Read the traces once; partitions start from clones of this source.
    let source = RequestSource::new(
        &e.workload,
        e.seed,
        &file.base,
        prep.setup.model.max_model_len,
    )?;
    let t_loop = Instant::now();
    let mut pending = PendingParts::default();
    let mut res = if parts == 1 {
        let mut source = source;
        let mut collector = collector(n);
        if parquet {
            collector.stream_batches(&dir.join("batches.parquet"), prep.memory.num_blocks)?;
        }
        let mut tracer = if tracing {
            Some(TraceWriter::create(&dir.join("trace.json"), n, trace_pp)?)
        } else {
            None
        };
        let res = traced_loop(&spec, &mut source, collector, &mut tracer, 0, n)?;
        if let Some(t) = tracer {
            t.finish()?;
        }
        res
    } else {
        // Replica partitions on separate threads; see `sim::Partition`.
        let ranges: Vec<(u32, u32)> = (0..parts)
            .map(|i| (n * i / parts, n * (i + 1) / parts))
            .collect();
        let outs: Vec<Result<(sim::SimResult, PathBuf, PathBuf)>> = ranges
            .par_iter()
            .enumerate()
            .map(|(i, &(lo, hi))| {
                let mut source = sim::Partition::new(source.clone(), e.router, e.seed, n, lo, hi);
                let pq = dir.join(format!(".batches.part{i:02}.parquet"));
                let tr = dir.join(format!(".trace.part{i:02}.json"));
                crate::cleanup::register(&pq);
                crate::cleanup::register(&tr);
                let mut collector = collector(n);
                if parquet {
                    collector.stream_batches(&pq, prep.memory.num_blocks)?;
                }
                let mut tracer = if tracing {
                    Some(TraceWriter::fragment(&tr)?)
                } else {
                    None
                };
                let res = traced_loop(&spec, &mut source, collector, &mut tracer, lo, hi)?;
                if let Some(t) = tracer {
                    t.finish_fragment()?;
                }
                Ok((res, pq, tr))
            })
            .collect();
        // A failed partition leaves no hidden part files behind (they can be gigabytes).
        if let Some(e) = outs.iter().position(Result::is_err) {
            for i in 0..ranges.len() {
                for p in [
                    dir.join(format!(".batches.part{i:02}.parquet")),
                    dir.join(format!(".trace.part{i:02}.json")),
                ] {
                    let _ = std::fs::remove_file(&p);
                    crate::cleanup::release(&p);
                }
            }
            return Err(outs
                .into_iter()
                .nth(e)
                .and_then(Result::err)
                .expect("an error"));
        }
        let mut merged: Option<sim::SimResult> = None;
        let (mut pq_parts, mut tr_parts) = (Vec::new(), Vec::new());
        for o in outs {
            let (r, pq, tr) = o?;
            pq_parts.push(pq);
            tr_parts.push(tr);
            merged = Some(match merged {
                None => r,
                Some(mut m) => {
                    m.collector.merge(r.collector);
                    m.issued += r.issued;
                    m.clipped += r.clipped;
                    m.end = m.end.max(r.end);
                    m.events += r.events;
                    m.replica_stats.extend(r.replica_stats);
                    m
                }
            });
        }
        if parquet {
            pending.batches = Some((
                pq_parts,
                dir.join("batches.parquet"),
                prep.memory.num_blocks,
            ));
        }
        if tracing {
            pending.trace = Some((dir.join("trace.json"), n, trace_pp, tr_parts));
        }
        merged.expect("at least one partition")
    };
    let loop_s = t_loop.elapsed().as_secs_f64();
    // Completion order depends on how replicas were partitioned; the summary must not.
    res.collector.requests.sort_by_key(|r| r.request_id);
    Ok((res, loop_s, pending))
}

/// Runs replicas `lo..hi`, handing every batch stage to `tracer` when there is one, and closes
/// the collector's batch stream.
fn traced_loop(
    spec: &SimSpec<'_>,
    source: &mut dyn sim::Arrivals,
    collector: vajra_metrics::Collector,
    tracer: &mut Option<TraceWriter>,
    lo: u32,
    hi: u32,
) -> Result<sim::SimResult> {
    let tracing = tracer.is_some();
    let mut on_slice = |sl: &StageSlice| {
        if let Some(t) = tracer.as_mut() {
            t.slice(sl);
        }
    };
    let sink: Option<&mut dyn FnMut(&StageSlice)> =
        if tracing { Some(&mut on_slice) } else { None };
    let mut res = sim::run_range(spec, source, collector, sink, lo, hi)?;
    res.collector.finish()?;
    Ok(res)
}

/// The summary of a finished simulation.
pub fn summarize(point: &Point, prep: &Prepared, res: &sim::SimResult) -> RunSummary {
    let e = &point.experiment;
    let par = prep.parallel();
    let devices = f64::from(par.world_size());
    let pools = match &prep.decode {
        None => Vec::new(),
        Some(d) => {
            let pf = |role: &str,
                      n: u32,
                      m: &MemoryPlan,
                      dev: &DeviceSpec,
                      p: vajra_core::config::ParallelConfig| {
                let w = f64::from(p.world_size());
                vajra_metrics::summary::PoolFacts {
                    role: role.to_owned(),
                    num_replicas: n,
                    stages: p.pipeline_parallel,
                    num_blocks: m.num_blocks,
                    peak_flops: dev.peak_flops * w,
                    peak_bytes_per_s: dev.mem_bandwidth * w,
                    devices_per_replica: p.world_size(),
                }
            };
            vec![
                pf(
                    "prefill",
                    prep.setup.num_replicas,
                    &prep.memory,
                    &prep.setup.device,
                    par,
                ),
                pf("decode", d.num_replicas, &d.memory, &d.device, d.par),
            ]
        }
    };
    let facts = ClusterFacts {
        pools,
        num_replicas: e.cluster.total_replicas(),
        stages: par.pipeline_parallel,
        num_blocks: prep.memory.num_blocks,
        peak_flops: prep.setup.device.peak_flops * devices,
        peak_bytes_per_s: prep.setup.device.mem_bandwidth * devices,
        issued: res.issued,
        clipped: res.clipped,
    };
    let metrics = Summary::compute(&res.collector, &e.slo, &facts);
    RunSummary {
        name: e.name.clone(),
        point: point.label.clone(),
        seed: e.seed,
        setup: prep.setup.clone(),
        simulated_s: res.end.as_secs_f64(),
        metrics,
    }
}

/// The event loop's view of a prepared point.
fn sim_spec<'a>(
    point: &'a Point,
    prep: &'a Prepared,
    progress: Option<&'a (dyn Fn(u64) + Sync)>,
    policy: Option<&'a sim::PolicyFactory>,
) -> SimSpec<'a> {
    let e = &point.experiment;
    SimSpec {
        num_replicas: e.cluster.total_replicas(),
        scheduler: &prep.scheduler,
        cache: &e.cache,
        num_blocks: prep.memory.num_blocks,
        max_model_len: prep.setup.model.max_model_len,
        router: e.router,
        router_staleness: vajra_core::time::Duration::from_secs_f64(e.cluster.router_staleness_s),
        slo: Some(&e.slo),
        predictor: &prep.predictor,
        seed: e.seed,
        progress,
        policy,
        step_times: None,
        disagg: None,
    }
}

/// The event loop's view of a prepared point's decode pool and KV link.
fn disagg_spec(prep: &Prepared) -> Option<sim::DisaggSpec<'_>> {
    let d = prep.decode.as_ref()?;
    let m = &prep.setup.model;
    Some(sim::DisaggSpec {
        num_prefill: prep.setup.num_replicas,
        decode_predictor: &d.predictor,
        decode_blocks: d.memory.num_blocks,
        decode_router: d.router,
        decode_scheduler: &d.scheduler,
        bandwidth: d.bandwidth,
        latency: vajra_core::time::Duration::from_secs_f64(d.link.latency_s),
        layerwise: d.layerwise,
        num_layers: m.num_layers,
        // Every layer's K and V of every KV head (the whole model, all TP shards).
        kv_bytes_per_token: m.kv_bytes_per_token(1) as f64,
    })
}

/// Runs a point's event loop in one thread with `policy` building each replica's batching
/// policy instead of the one `scheduler.policy` names: how an out-of-tree policy (one not in
/// `vajra-core`) runs in the simulator. Writes nothing; [`summarize`] turns the result into
/// the summary a run folder holds.
///
/// # Errors
/// A stalled simulation, or a scheduler config the policy rejects.
pub fn simulate_with_policy(
    file: &ExperimentFile,
    point: &Point,
    prep: &Prepared,
    policy: &sim::PolicyFactory,
) -> Result<sim::SimResult> {
    let mut res = simulate_alone(file, point, prep, Some(policy), None)?;
    res.collector.requests.sort_by_key(|r| r.request_id);
    Ok(res)
}

/// One event loop over the whole point, in this thread.
fn simulate_alone(
    file: &ExperimentFile,
    point: &Point,
    prep: &Prepared,
    policy: Option<&sim::PolicyFactory>,
    step_times: Option<&[(vajra_core::time::Timestamp, vajra_core::time::Timestamp)]>,
) -> Result<sim::SimResult> {
    let e = &point.experiment;
    let disagg = disagg_spec(prep);
    let mut spec = sim_spec(point, prep, None, policy);
    spec.step_times = step_times;
    spec.disagg = disagg.as_ref();
    let mut source = RequestSource::new(
        &e.workload,
        e.seed,
        &file.base,
        prep.setup.model.max_model_len,
    )?;
    let collector = vajra_metrics::Collector::new(&e.slo, e.cluster.total_replicas());
    sim::run(&spec, &mut source, collector, None)
}

/// Runs a point's event loop with each step starting and ending when `step_times` says (step-time
/// replay, `vajra-sim twin`) and, when `policy` is given, that batching policy; records every
/// step's requests. Writes nothing.
///
/// # Errors
/// A stalled simulation, or a scheduler config the policy rejects.
pub fn simulate_replay(
    file: &ExperimentFile,
    point: &Point,
    prep: &Prepared,
    step_times: &[(vajra_core::time::Timestamp, vajra_core::time::Timestamp)],
    policy: Option<&sim::PolicyFactory>,
) -> Result<sim::SimResult> {
    simulate_alone(file, point, prep, policy, Some(step_times))
}

/// Runs one point and writes its folder `dir`. With a load-independent router and an
/// open-loop workload, replicas are simulated in up to [`MAX_PARTITIONS`] partitions on
/// separate threads (unless `sequential`); `summary.json`, `requests.csv` and the tables are the
/// same either way, except that `batches.parquet` and `trace.json` list partitions one after
/// another instead of interleaving replicas in completion order.
///
/// # Errors
/// Setup errors, a stalled simulation, or an output that cannot be written.
pub fn run_point(
    file: &ExperimentFile,
    point: &Point,
    dir: &Path,
    trace: bool,
    sequential: bool,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<PointResult> {
    let t0 = Instant::now();
    let prep = prepare(file, point)?;
    let (res, loop_s, pending) =
        simulate(file, point, &prep, Some(dir), trace, sequential, progress)?;
    // The partitions' parts are joined on another thread while this one writes the rest.
    let (joined, summary) = rayon::join(
        || pending.finish(),
        || -> Result<_> {
            let summary = summarize(point, &prep, &res);
            write_point_files(file, point, dir, &res, &summary)?;
            Ok(summary)
        },
    );
    joined?;
    let summary = summary?;
    let mut warnings = prep.predictor.warnings;
    if res.clipped > 0 {
        let e = &point.experiment;
        let longest = e.workload.longest_request(prep.setup.model.max_model_len);
        let label = if point.label.is_empty() {
            e.name.as_str()
        } else {
            point.label.as_str()
        };
        warnings.push(format!(
            "{label}: {} of {} requests ({:.1} %) were clipped to {longest} tokens of prompt + output (model.max_model_len {}, workload.max_tokens {}); summary.json counts them as requests_clipped",
            res.clipped,
            res.issued,
            100.0 * res.clipped as f64 / res.issued.max(1) as f64,
            prep.setup.model.max_model_len,
            e.workload
                .max_tokens
                .map_or_else(|| "unset".to_owned(), |m| m.to_string())
        ));
    }
    Ok(PointResult {
        label: point.label.clone(),
        overrides: point.overrides.clone(),
        dir: dir.to_owned(),
        summary,
        loop_s,
        wall_s: t0.elapsed().as_secs_f64(),
        events: res.events,
        warnings,
    })
}

/// `config.resolved.toml`, `summary.json`, the request tables and the CDFs of one point.
fn write_point_files(
    file: &ExperimentFile,
    point: &Point,
    dir: &Path,
    res: &sim::SimResult,
    summary: &RunSummary,
) -> Result<()> {
    let e = &point.experiment;
    let resolved_path = dir.join("config.resolved.toml");
    let resolved = toml::to_string_pretty(&e.with_absolute_paths(&file.base))
        .map_err(write_err(&resolved_path))?;
    write_file(
        &dir.join("config.resolved.toml"),
        format!(
            "# {} — point {:?} of {}, every default filled in; runnable as is.\n{resolved}",
            e.name,
            point.label,
            file.path.display()
        )
        .as_bytes(),
    )?;
    write_run(
        dir,
        &res.collector,
        summary,
        Tables {
            csv: e.output.csv,
            parquet: e.output.parquet,
        },
    )?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(write_err(path))
}

/// Streams a Chrome/Perfetto trace: one complete event per batch stage, `pid` = replica,
/// `tid` = stage, times in microseconds (three decimals, formatted from integer nanoseconds).
pub struct TraceWriter {
    path: PathBuf,
    w: std::io::BufWriter<std::fs::File>,
    buf: Vec<u8>,
    error: Option<std::io::Error>,
}

/// Appends the decimal digits of `v`.
fn push_u64(b: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    b.extend_from_slice(&tmp[i..]);
}

/// Appends nanoseconds as microseconds with three decimals (exact).
fn push_micros(b: &mut Vec<u8>, ns: u64) {
    push_u64(b, ns / 1000);
    let f = ns % 1000;
    b.extend_from_slice(&[
        b'.',
        b'0' + (f / 100) as u8,
        b'0' + (f / 10 % 10) as u8,
        b'0' + (f % 10) as u8,
    ]);
}

impl TraceWriter {
    /// Creates the file and writes the process and thread names.
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn create(path: &Path, replicas: u32, stages: u32) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(write_err(path))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(b"{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n")
            .map_err(write_err(path))?;
        let mut first = true;
        for r in 0..replicas {
            for s in 0..stages {
                if !first {
                    w.write_all(b",\n").map_err(write_err(path))?;
                }
                first = false;
                write!(
                    w,
                    "{{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":{r},\"tid\":{s},\"args\":{{\"name\":\"stage {s}\"}}}},\n{{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":{r},\"tid\":{s},\"args\":{{\"name\":\"replica {r}\"}}}}"
                )
                .map_err(write_err(path))?;
            }
        }
        Ok(TraceWriter {
            path: path.to_owned(),
            w,
            buf: Vec::with_capacity(256),
            error: None,
        })
    }

    /// A file of slices only (no header or footer), for [`TraceWriter::assemble`].
    ///
    /// # Errors
    /// The file cannot be created.
    pub fn fragment(path: &Path) -> Result<Self> {
        let f = std::fs::File::create(path).map_err(write_err(path))?;
        Ok(TraceWriter {
            path: path.to_owned(),
            w: std::io::BufWriter::with_capacity(1 << 20, f),
            buf: Vec::with_capacity(256),
            error: None,
        })
    }

    /// Flushes a fragment.
    ///
    /// # Errors
    /// Any write error.
    pub fn finish_fragment(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(write_err(&self.path)(e));
        }
        self.w.flush().map_err(write_err(&self.path))
    }

    /// Writes `dest` from the header, the fragments in order (deleting them) and the footer.
    ///
    /// # Errors
    /// A fragment that cannot be read or the file that cannot be written.
    pub fn assemble(dest: &Path, replicas: u32, stages: u32, fragments: &[PathBuf]) -> Result<()> {
        let mut t = TraceWriter::create(dest, replicas, stages)?;
        for f in fragments {
            let mut src = std::fs::File::open(f).map_err(write_err(f))?;
            std::io::copy(&mut src, &mut t.w).map_err(write_err(f))?;
            std::fs::remove_file(f).map_err(write_err(f))?;
        }
        t.finish()
    }

    /// Appends one slice (a write error is kept for [`TraceWriter::finish`]). Formatted by
    /// hand: `write!` costs more than the simulation step that produced the slice.
    pub fn slice(&mut self, sl: &StageSlice) {
        if self.error.is_some() {
            return;
        }
        let b = &mut self.buf;
        b.clear();
        b.extend_from_slice(b",\n{\"ph\":\"X\",\"name\":\"batch ");
        push_u64(b, sl.step);
        b.extend_from_slice(b"\",\"pid\":");
        push_u64(b, u64::from(sl.replica));
        b.extend_from_slice(b",\"tid\":");
        push_u64(b, u64::from(sl.stage));
        b.extend_from_slice(b",\"ts\":");
        push_micros(b, sl.start.0);
        b.extend_from_slice(b",\"dur\":");
        push_micros(b, sl.dur.0);
        b.extend_from_slice(b",\"args\":{\"size\":");
        push_u64(b, u64::from(sl.size));
        b.extend_from_slice(b",\"prefill_tokens\":");
        push_u64(b, u64::from(sl.prefill_tokens));
        b.extend_from_slice(b",\"decode_tokens\":");
        push_u64(b, u64::from(sl.decode_tokens));
        b.extend_from_slice(b"}}");
        if let Err(e) = self.w.write_all(b) {
            self.error = Some(e);
        }
    }

    /// Closes the JSON and flushes.
    ///
    /// # Errors
    /// Any write error.
    pub fn finish(mut self) -> Result<()> {
        if let Some(e) = self.error.take() {
            return Err(write_err(&self.path)(e));
        }
        self.w.write_all(b"\n]}\n").map_err(write_err(&self.path))?;
        self.w.flush().map_err(write_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_formatted_numbers_match_the_standard_formatter() {
        for v in [0u64, 7, 10, 999, 1000, 123_456_789, u64::MAX] {
            let mut b = Vec::new();
            push_u64(&mut b, v);
            assert_eq!(String::from_utf8(b).unwrap(), v.to_string());
        }
        let mut b = Vec::new();
        push_micros(&mut b, 1_234_567);
        assert_eq!(String::from_utf8(b).unwrap(), "1234.567");
        let mut b = Vec::new();
        push_micros(&mut b, 5);
        assert_eq!(String::from_utf8(b).unwrap(), "0.005");
    }
}
