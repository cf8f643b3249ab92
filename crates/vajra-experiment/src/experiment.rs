//! Experiment files: one TOML with model, cluster, scheduler, router, cache, predictor,
//! workload, SLOs, seed and output, plus an optional `[sweep]` table whose keys are dotted paths
//! into the file and whose values are arrays: the run is the Cartesian product.
//!
//! ```toml
//! name = "quickstart"
//! seed = 42
//! [model]
//! name = "meta-llama/Meta-Llama-3-8B"      # built-in shape, or config = "path/config.json"
//! [cluster]
//! device = "h100"
//! num_replicas = 1
//! [scheduler]
//! policy = { type = "sarathi", chunk_size = 512 }
//! [workload]
//! num_requests = 1000
//! arrival = { type = "poisson", qps = 4.0 }
//! lengths = { type = "trace", path = "../traces/azure_conv_synth.csv" }
//! [sweep]
//! "scheduler.policy" = [{ type = "sarathi", chunk_size = 512 }, { type = "vllm_v1" }]
//! "workload.arrival.qps" = [2.0, 4.0]
//! ```
//!
//! Input paths (traces, profiles, model configs) are relative to the experiment file's folder;
//! the output folder is relative to the working directory.

use crate::catalog::{self, DeviceSpec};
use crate::error::{ExperimentError, Result};
use crate::predictor::PredictorConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use vajra_core::config::{CacheConfig, InstanceRole, ModelConfig, ParallelConfig};
use vajra_core::router::RouterConfig;
use vajra_core::sched::config::SchedulerConfig;
use vajra_metrics::SloConfig;
use vajra_workload::WorkloadConfig;

/// The model of every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A built-in shape (`vajra-sim list` prints them), e.g. `meta-llama/Meta-Llama-3-8B`.
    #[serde(default)]
    pub name: Option<String>,
    /// A Hugging Face `config.json` instead of a built-in name.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Override of the longest sequence (prompt + output).
    #[serde(default)]
    pub max_model_len: Option<u32>,
}

/// The cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Device kind (`h100`, `h200`, `a100`).
    pub device: String,
    /// Replicas.
    #[serde(default = "one")]
    pub num_replicas: u32,
    /// Tensor-parallel width of a replica.
    #[serde(default = "one")]
    pub tensor_parallel: u32,
    /// Pipeline stages of a replica.
    #[serde(default = "one")]
    pub pipeline_parallel: u32,
    /// Override of the device price per hour (US dollars), for capacity per dollar.
    #[serde(default)]
    pub price_per_hour: Option<f64>,
    /// How old the replica loads the router sees may be, in seconds (0 = exact at every
    /// arrival). Real routers see load reports pushed every so often (vLLM's data-parallel
    /// balancer about every 100 ms) and count their own routing decisions in between.
    #[serde(default)]
    pub router_staleness_s: f64,
    /// Disaggregated prefill and decode: one `prefill` pool and one `decode` pool of replicas,
    /// e.g. `[{ role = "prefill", num_replicas = 2 }, { role = "decode", num_replicas = 2 }]`
    /// (device, tensor_parallel and pipeline_parallel default to the cluster's). Empty: every
    /// replica is colocated. With pools, `num_replicas` is left unset (each pool sets its own);
    /// `[router]` picks the prefill replica and `decode_router` the decode replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolSpec>,
    /// How the KV cache moves from the prefill pool to the decode pool (with `pools`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_transfer: Option<KvTransferSpec>,
    /// The router that picks a decode replica for a prefilled request (with `pools`; default
    /// `least_kv_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_router: Option<RouterConfig>,
}

/// A pool of replicas with one role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// `prefill` or `decode`.
    pub role: InstanceRole,
    /// Replicas in the pool.
    pub num_replicas: u32,
    /// Device kind (default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Tensor-parallel width of a replica (default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_parallel: Option<u32>,
    /// Pipeline stages of a replica (default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline_parallel: Option<u32>,
    /// Override of the device price per hour (default: the cluster's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// The pool's own scheduler (a whole `[scheduler]` table; default: the file's), e.g. a
    /// prefill pool with a large token budget and a decode pool with many sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerConfig>,
}

/// The KV-transfer link between a prefill replica and a decode replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvTransferSpec {
    /// A built-in link (`vajra-sim list` prints them): `nvlink`, `pcie4`, `pcie5`,
    /// `rdma_100g`, `rdma_200g`, `rdma_400g`.
    #[serde(default = "default_link")]
    pub link: String,
    /// Override of the link's bandwidth per GPU and direction, in Gbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_gbps: Option<f64>,
    /// Override of the latency of one transfer (wire plus transfer-engine setup), in
    /// microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<f64>,
    /// Whether the transfer overlaps the last prefill step layer by layer (each layer's KV
    /// is sent as soon as it is computed), so that only the last layer's share and the latency
    /// follow the prefill; otherwise the whole transfer starts after it.
    #[serde(default = "yes")]
    pub layerwise: bool,
}

impl Default for KvTransferSpec {
    fn default() -> Self {
        KvTransferSpec {
            link: default_link(),
            bandwidth_gbps: None,
            latency_us: None,
            layerwise: true,
        }
    }
}

fn default_link() -> String {
    "rdma_400g".into()
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

impl ClusterSpec {
    /// Replicas in the cluster: the pools' sum, or `num_replicas`.
    pub fn total_replicas(&self) -> u32 {
        if self.pools.is_empty() {
            self.num_replicas
        } else {
            self.pools.iter().map(|p| p.num_replicas).sum()
        }
    }

    /// Each pool as a cluster of its own (its device, widths and replica count, the rest the
    /// cluster's), with its role; a colocated cluster is one pool.
    pub fn pool_views(&self) -> Vec<(InstanceRole, ClusterSpec)> {
        if self.pools.is_empty() {
            return vec![(InstanceRole::Colocated, self.clone())];
        }
        self.pools
            .iter()
            .map(|p| {
                let c = ClusterSpec {
                    device: p.device.clone().unwrap_or_else(|| self.device.clone()),
                    num_replicas: p.num_replicas,
                    tensor_parallel: p.tensor_parallel.unwrap_or(self.tensor_parallel),
                    pipeline_parallel: p.pipeline_parallel.unwrap_or(self.pipeline_parallel),
                    price_per_hour: p.price_per_hour.or(self.price_per_hour),
                    pools: Vec::new(),
                    kv_transfer: None,
                    decode_router: None,
                    ..self.clone()
                };
                (p.role, c)
            })
            .collect()
    }
}

/// What a run writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Output folder (default `runs/<name>`), relative to the working directory.
    pub dir: Option<PathBuf>,
    /// Write `trace.json` (Chrome/Perfetto, one slice per batch stage).
    pub trace: bool,
    /// Write `requests.parquet` and `batches.parquet`.
    pub parquet: bool,
    /// Write `requests.csv`.
    pub csv: bool,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            dir: None,
            trace: true,
            parquet: true,
            csv: true,
        }
    }
}

/// The root seed of a file that sets none.
pub const DEFAULT_SEED: u64 = 42;

fn default_seed() -> u64 {
    DEFAULT_SEED
}

/// One experiment (one point of a sweep).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Name (default: the file name without extension).
    #[serde(default)]
    pub name: String,
    /// Root seed: every random stream derives from it.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Model.
    pub model: ModelSpec,
    /// Cluster.
    pub cluster: ClusterSpec,
    /// Scheduler of every replica.
    pub scheduler: SchedulerConfig,
    /// Global router.
    #[serde(default)]
    pub router: RouterConfig,
    /// KV cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Execution-time predictor.
    #[serde(default)]
    pub predictor: PredictorConfig,
    /// Workload.
    pub workload: WorkloadConfig,
    /// Service-level objectives.
    #[serde(default)]
    pub slo: SloConfig,
    /// Outputs.
    #[serde(default)]
    pub output: OutputConfig,
    /// Capacity search (`vajra-sim capacity`).
    #[serde(default)]
    pub capacity: CapacityConfig,
    /// Devices of this file (`[[devices]]`, the fields of a built-in one), which
    /// `cluster.device` may name beside the built-ins (a same-named one replaces the built-in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceSpec>,
}

/// How `vajra-sim capacity` searches for the highest sustainable rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// Stop when the bracket [passing, failing] is narrower than this fraction of the passing
    /// rate.
    pub precision: f64,
    /// Lowest rate tried (requests/s); below it the configuration has no capacity.
    pub min_qps: f64,
    /// Highest rate tried (requests/s).
    pub max_qps: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        CapacityConfig {
            precision: 0.02,
            min_qps: 0.01,
            max_qps: 100_000.0,
        }
    }
}

/// The most points one experiment file may expand to.
pub const MAX_POINTS: usize = 1_000_000;

/// One point of an experiment file.
#[derive(Debug, Clone)]
pub struct Point {
    /// Label (`policy=sarathi,qps=2`), empty without a sweep.
    pub label: String,
    /// Folder name under the output folder, empty without a sweep.
    pub folder: String,
    /// The values this point sets, by sweep key.
    pub overrides: Vec<(String, String)>,
    /// The experiment.
    pub experiment: Experiment,
}

/// An experiment file, expanded.
#[derive(Debug, Clone)]
pub struct ExperimentFile {
    /// The file.
    pub path: PathBuf,
    /// Its folder (base of relative input paths).
    pub base: PathBuf,
    /// Its points (one without a sweep).
    pub points: Vec<Point>,
    /// Whether it has a `[sweep]`.
    pub is_sweep: bool,
}

fn short_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        // A pool: `2P`, `1D` (a pool list reads `2P1D`).
        toml::Value::Table(t)
            if t.get("num_replicas").is_some()
                && t.get("role").and_then(|r| r.as_str()).is_some() =>
        {
            let role = t.get("role").and_then(|r| r.as_str()).unwrap_or_default();
            let tag = match role {
                "prefill" => "P".to_owned(),
                "decode" => "D".to_owned(),
                other => other.to_owned(),
            };
            // What else the pool sets (a device, widths, its own scheduler), so that two pools of
            // one size still read apart: `1P(h100-tensor_parallel2)`.
            let extra: Vec<String> = t
                .iter()
                .filter(|(k, _)| *k != "role" && *k != "num_replicas")
                .map(|(k, x)| match x {
                    toml::Value::Table(inner) => {
                        let nested: Vec<String> = inner
                            .iter()
                            .filter_map(|(_, y)| y.as_table().map(|_| short_value(y)))
                            .collect();
                        [short_value(x)]
                            .into_iter()
                            .chain(nested)
                            .filter(|v| !v.is_empty())
                            .collect::<Vec<_>>()
                            .join("-")
                    }
                    x => format!("{k}{}", short_value(x)),
                })
                .collect();
            if extra.is_empty() {
                format!("{}{tag}", short_value(&t["num_replicas"]))
            } else {
                format!(
                    "{}{tag}({})",
                    short_value(&t["num_replicas"]),
                    extra.join("-")
                )
            }
        }
        toml::Value::Table(t) => {
            let mut parts: Vec<String> = Vec::new();
            if let Some(ty) = t.get("type") {
                parts.push(short_value(ty));
            }
            if let Some(p) = t.get("pools") {
                parts.push(short_value(p));
            }
            for (k, x) in t {
                if k != "type" && !matches!(x, toml::Value::Table(_) | toml::Value::Array(_)) {
                    parts.push(format!("{k}{}", short_value(x)));
                }
            }
            parts.join("-")
        }
        toml::Value::Array(a)
            if !a.is_empty()
                && a.iter()
                    .all(|x| x.get("role").is_some() && x.get("num_replicas").is_some()) =>
        {
            a.iter().map(short_value).collect::<String>()
        }
        toml::Value::Array(a) => a.iter().map(short_value).collect::<Vec<_>>().join("+"),
        toml::Value::Datetime(d) => d.to_string(),
    }
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn set_path(
    root: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut t = root;
    for (i, p) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            t.insert((*p).to_owned(), value);
            return Ok(());
        }
        let entry = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(format!(
                    "`{}` is a {}, not a table",
                    parts[..=i].join("."),
                    other.type_str()
                ));
            }
        };
    }
    Ok(())
}

impl Experiment {
    /// A copy whose relative input paths (model config, profile and network folders, traces)
    /// are made absolute against `base`, so that it runs from any folder (what
    /// `config.resolved.toml` holds). The output folder stays relative to the working
    /// directory, as documented.
    pub fn with_absolute_paths(&self, base: &Path) -> Experiment {
        let abs = |p: &mut PathBuf| {
            if p.is_relative() {
                let joined = base.join(&*p);
                *p = std::fs::canonicalize(&joined).unwrap_or(joined);
            }
        };
        let mut e = self.clone();
        if let Some(p) = &mut e.model.config {
            abs(p);
        }
        if let Some(p) = &mut e.predictor.profile
            && p.as_os_str() != "roofline"
        {
            abs(p);
        }
        if let Some(p) = &mut e.predictor.network {
            abs(p);
        }
        for p in e.workload.input_paths_mut() {
            abs(p);
        }
        e
    }
}

impl ExperimentFile {
    /// Reads, expands and validates an experiment file.
    ///
    /// # Errors
    /// An unreadable file, malformed TOML, an unknown key, a bad value, or a bad sweep.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ExperimentError::File {
            path: path.to_owned(),
            message: format!("cannot read: {e}"),
        })?;
        let exp_err = |message: String| ExperimentError::File {
            path: path.to_owned(),
            message,
        };
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| exp_err(format!("not valid TOML: {e}")))?;
        let sweep = match table.remove("sweep") {
            None => None,
            Some(toml::Value::Table(s)) => Some(s),
            Some(other) => {
                return Err(exp_err(format!(
                    "`sweep` must be a table of dotted keys to arrays, not a {}",
                    other.type_str()
                )));
            }
        };
        let stem = path
            .file_stem()
            .map_or_else(|| "experiment".into(), |s| s.to_string_lossy().into_owned());
        let base = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        let is_sweep = sweep.is_some();
        // Without a sweep, parse the text itself so errors carry line numbers.
        let mut combos: Vec<Vec<(String, toml::Value)>> = vec![Vec::new()];
        if let Some(s) = &sweep {
            if s.is_empty() {
                return Err(exp_err("`sweep` is empty: give at least one key".into()));
            }
            for (k, v) in s {
                let toml::Value::Array(values) = v else {
                    return Err(exp_err(format!(
                        "sweep key `{k}` must be an array of values, not a {}",
                        v.type_str()
                    )));
                };
                if values.is_empty() {
                    return Err(exp_err(format!("sweep key `{k}` has no values")));
                }
                if k == "sweep" || k.starts_with("sweep.") {
                    return Err(exp_err(format!("sweep key `{k}` cannot sweep the sweep")));
                }
                // Checked before expanding: a product of many keys must not fill the memory.
                let points = combos.len().saturating_mul(values.len());
                if points > MAX_POINTS {
                    return Err(exp_err(format!(
                        "the sweep has {} points (the product of its keys' value counts), more than {MAX_POINTS}: split it into several files",
                        s.values()
                            .map(|v| v.as_array().map_or(1, Vec::len))
                            .fold(1usize, usize::saturating_mul)
                    )));
                }
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((k.clone(), v.clone()));
                            c
                        })
                    })
                    .collect();
            }
        }
        let n = combos.len();
        // Folder prefixes sort in point order: three digits, more for sweeps past 1,000 points.
        let width = n.saturating_sub(1).to_string().len().max(3);
        let mut points = Vec::with_capacity(n);
        for (i, combo) in combos.into_iter().enumerate() {
            let mut experiment: Experiment = if is_sweep {
                let mut t = table.clone();
                for (k, v) in &combo {
                    set_path(&mut t, k, v.clone())
                        .map_err(|m| exp_err(format!("sweep key `{k}`: {m}")))?;
                }
                let label = combo
                    .iter()
                    .map(|(k, v)| format!("{k}={}", short_value(v)))
                    .collect::<Vec<_>>()
                    .join(", ");
                toml::Value::Table(t)
                    .try_into()
                    .map_err(|e: toml::de::Error| exp_err(format!("sweep point {label}: {e}")))?
            } else {
                toml::from_str(&text).map_err(|e| exp_err(e.to_string()))?
            };
            if experiment.name.is_empty() {
                experiment.name = stem.clone();
            }
            let overrides: Vec<(String, String)> = combo
                .iter()
                .map(|(k, v)| (k.clone(), short_value(v)))
                .collect();
            let label = overrides
                .iter()
                .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
                .collect::<Vec<_>>()
                .join(",");
            let folder = if is_sweep {
                sanitize(&format!("{i:0width$}-{label}"))
            } else {
                String::new()
            };
            validate(&experiment, &base).map_err(|e| match (&e, is_sweep) {
                (_, true) => exp_err(format!("sweep point {label}: {e}")),
                _ => e,
            })?;
            points.push(Point {
                label,
                folder,
                overrides,
                experiment,
            });
        }
        Ok(ExperimentFile {
            path: path.to_owned(),
            base,
            points,
            is_sweep,
        })
    }
}

/// The model config an experiment names.
///
/// # Errors
/// An unknown name, an unreadable `config.json`, both or neither given.
pub fn resolve_model(spec: &ModelSpec, base: &Path) -> Result<ModelConfig> {
    let mut m = match (&spec.name, &spec.config) {
        (Some(n), None) => catalog::model(n).ok_or_else(|| {
            ExperimentError::invalid(
                "model.name",
                n,
                format!(
                    "a built-in model ({}) or model.config = path to a config.json",
                    catalog::model_names()
                ),
            )
        })?,
        (None, Some(p)) => {
            let path = base.join(p);
            let text = std::fs::read_to_string(&path).map_err(|e| ExperimentError::File {
                path: path.clone(),
                message: format!("model.config: cannot read: {e}"),
            })?;
            let name = path
                .parent()
                .and_then(|d| d.file_name())
                .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
            ModelConfig::from_hf_config_json(&text, &name)?
        }
        (Some(_), Some(_)) => {
            return Err(ExperimentError::invalid(
                "model",
                "both name and config",
                "one of model.name or model.config",
            ));
        }
        (None, None) => {
            return Err(ExperimentError::invalid(
                "model",
                "(neither name nor config)",
                "model.name = a built-in model, or model.config = a config.json",
            ));
        }
    };
    if let Some(l) = spec.max_model_len {
        if l < 2 {
            return Err(ExperimentError::invalid(
                "model.max_model_len",
                l,
                "an integer ≥ 2",
            ));
        }
        m.max_model_len = l;
    }
    Ok(m)
}

/// The device an experiment names.
///
/// # Errors
/// An unknown device or a bad price.
pub fn resolve_device(c: &ClusterSpec, custom: &[DeviceSpec]) -> Result<DeviceSpec> {
    for (i, d) in custom.iter().enumerate() {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let bad = if d.name.trim().is_empty() {
            Some(("name", d.name.clone(), "a non-empty name"))
        } else if d.memory_bytes == 0 {
            Some(("memory_bytes", "0".into(), "bytes > 0"))
        } else if !positive(d.peak_flops) {
            Some((
                "peak_flops",
                d.peak_flops.to_string(),
                "FLOP/s > 0 (dense bf16)",
            ))
        } else if !positive(d.mem_bandwidth) {
            Some(("mem_bandwidth", d.mem_bandwidth.to_string(), "bytes/s > 0"))
        } else if !positive(d.link_bandwidth) {
            Some((
                "link_bandwidth",
                d.link_bandwidth.to_string(),
                "bytes/s > 0 per direction",
            ))
        } else if !(d.price_per_hour.is_finite() && d.price_per_hour >= 0.0) {
            Some((
                "price_per_hour",
                d.price_per_hour.to_string(),
                "dollars ≥ 0",
            ))
        } else {
            None
        };
        if let Some((field, v, allowed)) = bad {
            return Err(ExperimentError::invalid(
                format!("devices[{i}].{field}"),
                v,
                allowed,
            ));
        }
    }
    let mine = custom
        .iter()
        .find(|d| d.name.eq_ignore_ascii_case(&c.device))
        .cloned();
    let mut d = mine.or_else(|| catalog::device(&c.device)).ok_or_else(|| {
        let mut names = catalog::device_names();
        for d in custom {
            names = format!("{names}, {}", d.name);
        }
        ExperimentError::invalid(
            "cluster.device",
            &c.device,
            format!("{names} (or a [[devices]] entry of this file)"),
        )
    })?;
    if let Some(p) = c.price_per_hour {
        if !(p.is_finite() && p >= 0.0) {
            return Err(ExperimentError::invalid(
                "cluster.price_per_hour",
                p,
                "a finite number of dollars ≥ 0",
            ));
        }
        d.price_per_hour = p;
    }
    Ok(d)
}

/// The replica shape.
pub fn parallel(c: &ClusterSpec) -> ParallelConfig {
    ParallelConfig {
        tensor_parallel: c.tensor_parallel,
        pipeline_parallel: c.pipeline_parallel,
    }
}

/// Moves a field error under `prefix`, replacing the field's own leading `strip` (a pool's
/// `cluster.device` is `cluster.pools[1].device`).
fn under<'a>(
    prefix: &'a str,
    strip: &'a str,
) -> impl Fn(vajra_core::CoreError) -> ExperimentError + 'a {
    move |e| match e {
        vajra_core::CoreError::InvalidField {
            field,
            value,
            allowed,
        } => ExperimentError::invalid(
            format!("{prefix}.{}", field.strip_prefix(strip).unwrap_or(&field)),
            value,
            allowed,
        ),
        e => ExperimentError::Core(e),
    }
}

/// A replica shape's checks (device, replica count, widths), with fields named under `prefix`.
fn validate_shape(
    c: &ClusterSpec,
    prefix: &str,
    m: &ModelConfig,
    devices: &[DeviceSpec],
) -> Result<()> {
    resolve_device(c, devices).map_err(|e| match e {
        ExperimentError::Core(e) => under(prefix, "cluster.")(e),
        e => e,
    })?;
    if c.num_replicas < 1 || c.num_replicas > 100_000 {
        return Err(ExperimentError::invalid(
            format!("{prefix}.num_replicas"),
            c.num_replicas,
            "1 to 100000",
        ));
    }
    parallel(c).validate().map_err(under(prefix, "cluster."))?;
    if !catalog::tp_divides(m, c.tensor_parallel) {
        return Err(ExperimentError::invalid(
            format!("{prefix}.tensor_parallel"),
            c.tensor_parallel,
            format!(
                "a width dividing the model's {} attention heads ({} KV heads)",
                m.num_heads, m.num_kv_heads
            ),
        ));
    }
    if c.pipeline_parallel > m.num_layers {
        return Err(ExperimentError::invalid(
            format!("{prefix}.pipeline_parallel"),
            c.pipeline_parallel,
            format!("at most the model's {} layers", m.num_layers),
        ));
    }
    Ok(())
}

/// The pool settings of a cluster: one prefill pool and one decode pool, or none (and then no
/// transfer link or decode router).
fn validate_pools(c: &ClusterSpec) -> Result<()> {
    if c.pools.is_empty() {
        if c.kv_transfer.is_some() {
            return Err(ExperimentError::invalid(
                "cluster.kv_transfer",
                "set",
                "only with cluster.pools (a colocated cluster transfers no KV)",
            ));
        }
        if c.decode_router.is_some() {
            return Err(ExperimentError::invalid(
                "cluster.decode_router",
                "set",
                "only with cluster.pools (a colocated cluster has no decode pool)",
            ));
        }
        return Ok(());
    }
    if c.num_replicas != 1 {
        return Err(ExperimentError::invalid(
            "cluster.num_replicas",
            c.num_replicas,
            "unset with cluster.pools (each pool sets its num_replicas)",
        ));
    }
    let roles: Vec<InstanceRole> = c.pools.iter().map(|p| p.role).collect();
    if roles.len() != 2
        || !roles.contains(&InstanceRole::Prefill)
        || !roles.contains(&InstanceRole::Decode)
    {
        return Err(ExperimentError::invalid(
            "cluster.pools",
            format!(
                "[{}]",
                roles
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "one pool with role = \"prefill\" and one with role = \"decode\"",
        ));
    }
    if let Some(r) = &c.decode_router {
        r.validate()
            .map_err(under("cluster.decode_router", "router."))?;
    }
    let t = c.kv_transfer.clone().unwrap_or_default();
    catalog::resolve_link(&t)?;
    Ok(())
}

/// Checks everything that can be checked without running.
///
/// # Errors
/// The first bad field, named.
pub fn validate(e: &Experiment, base: &Path) -> Result<()> {
    // The name is the default output folder (`runs/<name>`): a name, never a path.
    let n = &e.name;
    if n.is_empty()
        || n == "."
        || n == ".."
        || n.chars().count() > 200
        || n.chars().any(|c| c == '/' || c == '\\' || c.is_control())
    {
        return Err(ExperimentError::invalid(
            "name",
            format!("{n:?}"),
            "a name of 1 to 200 characters without `/`, `\\` or control characters, not `.` or `..` (set output.dir or -o for another folder)",
        ));
    }
    let m = resolve_model(&e.model, base)?;
    validate_pools(&e.cluster)?;
    let st = e.cluster.router_staleness_s;
    if !(st.is_finite() && (0.0..=vajra_core::time::MAX_SECS).contains(&st)) {
        return Err(ExperimentError::invalid(
            "cluster.router_staleness_s",
            st,
            "a finite number of seconds ≥ 0 (0 = the router sees exact loads)",
        ));
    }
    let views = e.cluster.pool_views();
    for (i, (_, c)) in views.iter().enumerate() {
        let prefix = if e.cluster.pools.is_empty() {
            "cluster".to_owned()
        } else {
            format!("cluster.pools[{i}]")
        };
        validate_shape(c, &prefix, &m, &e.devices)?;
    }
    // The checks a replica's scheduler makes when a run starts, so that what validates runs.
    vajra_core::sched::Scheduler::check_config(
        &e.scheduler,
        &e.cache,
        m.max_model_len,
        e.scheduler.policy.build().whole_prompt_budget(),
    )?;
    for (i, p) in e.cluster.pools.iter().enumerate() {
        if let Some(sc) = &p.scheduler {
            vajra_core::sched::Scheduler::check_config(
                sc,
                &e.cache,
                m.max_model_len,
                sc.policy.build().whole_prompt_budget(),
            )
            .map_err(under(&format!("cluster.pools[{i}]"), ""))?;
        }
    }
    e.router.validate()?;
    e.cache.validate()?;
    e.predictor.validate()?;
    e.workload.validate()?;
    e.slo.validate()?;
    if e.scheduler.late_requests == vajra_core::sched::config::LatePolicy::Reject
        && e.slo.ttft_s.is_none()
        && e.slo.classes.iter().all(|c| c.ttft_s.is_none())
    {
        return Err(ExperimentError::invalid(
            "scheduler.late_requests",
            "\"reject\"",
            "\"serve\", or set slo.ttft_s or a class's ttft_s (a request is late against its TTFT target)",
        ));
    }
    for (i, t) in e.workload.tenants.iter().enumerate() {
        if let Some(c) = t.slo_class
            && c as usize >= e.slo.classes.len()
        {
            return Err(ExperimentError::invalid(
                format!("workload.tenants[{i}].slo_class"),
                c,
                format!(
                    "an index into [[slo.classes]] (it defines {}: {})",
                    e.slo.classes.len(),
                    e.slo
                        .classes
                        .iter()
                        .enumerate()
                        .map(|(k, c)| format!("{k} = {:?}", c.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    let c = e.capacity;
    if !(c.precision.is_finite() && c.precision > 0.0 && c.precision < 1.0) {
        return Err(ExperimentError::invalid(
            "capacity.precision",
            c.precision,
            "a fraction in (0, 1)",
        ));
    }
    if !(c.min_qps.is_finite() && c.min_qps > 0.0 && c.max_qps.is_finite() && c.max_qps > c.min_qps)
    {
        return Err(ExperimentError::invalid(
            "capacity.max_qps",
            c.max_qps,
            format!("a finite rate above capacity.min_qps = {}", c.min_qps),
        ));
    }
    for (field, p) in [
        ("predictor.profile", e.predictor.profile.as_ref()),
        ("predictor.network", e.predictor.network.as_ref()),
    ] {
        if let Some(p) = p
            && p.as_os_str() != "roofline"
            && !base.join(p).is_dir()
        {
            return Err(ExperimentError::invalid(
                field,
                base.join(p).display(),
                "an existing folder (relative to the experiment file), or \"roofline\"",
            ));
        }
    }
    for p in workload_paths(&e.workload) {
        let full = base.join(p);
        if !full.is_file() {
            return Err(ExperimentError::invalid(
                "workload trace path",
                full.display(),
                "an existing file (relative to the experiment file)",
            ));
        }
    }
    Ok(())
}

fn workload_paths(w: &WorkloadConfig) -> Vec<&Path> {
    use vajra_workload::config::{ArrivalConfig, LengthsConfig};
    let mut v = Vec::new();
    if let ArrivalConfig::Trace(t) = &w.arrival {
        v.push(t.path.as_path());
    }
    let lens = w
        .lengths
        .iter()
        .chain(w.tenants.iter().filter_map(|t| t.lengths.as_ref()));
    for l in lens {
        if let LengthsConfig::Trace { path, .. } = l {
            v.push(path.as_path());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vajra-exp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    const BASE: &str = r#"
[model]
name = "Llama-2-7b-hf"
[cluster]
device = "h100"
[scheduler]
policy = { type = "sarathi", chunk_size = 512 }
[workload]
num_requests = 10
arrival = { type = "poisson", qps = 1.0 }
lengths = { type = "fixed", prompt = 100, output = 10 }
"#;

    #[test]
    fn a_sweep_expands_to_the_cartesian_product_with_labels() {
        let p = write(
            "sweep.toml",
            &format!(
                "{BASE}\n[sweep]\n\"scheduler.policy\" = [{{ type = \"sarathi\", chunk_size = 256 }}, {{ type = \"vllm_v1\" }}]\n\"workload.arrival.qps\" = [1.0, 2.0, 4.0]\n"
            ),
        );
        let f = ExperimentFile::load(&p).unwrap();
        assert_eq!(f.points.len(), 6);
        assert_eq!(f.points[0].label, "policy=sarathi-chunk_size256,qps=1");
        assert_eq!(f.points[5].folder, "005-policy=vllm_v1_qps=4");
        assert_eq!(f.points[0].experiment.name, "sweep");
    }

    #[test]
    fn an_unknown_key_is_rejected_with_its_name_and_line() {
        let p = write("unk.toml", &format!("{BASE}\n[cache]\nblok_size = 16\n"));
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("blok_size") && e.contains("line"), "{e}");
    }

    #[test]
    fn an_unknown_policy_lists_the_policies() {
        let p = write("pol.toml", &BASE.replace("\"sarathi\"", "\"fifo\""));
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("fifo") && e.contains("vllm_v1"), "{e}");
    }

    #[test]
    fn an_unknown_model_or_device_names_the_built_ins() {
        let p = write("m.toml", &BASE.replace("Llama-2-7b-hf", "gpt-5"));
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("model.name") && e.contains("Meta-Llama-3-8B"),
            "{e}"
        );
        let p = write("d.toml", &BASE.replace("\"h100\"", "\"tpu\""));
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("cluster.device") && e.contains("a100"), "{e}");
    }

    #[test]
    fn a_file_may_define_its_own_devices_and_built_ins_answer_to_their_marketing_names() {
        let custom = "\n[[devices]]\nname = \"rtx5090\"\nmemory_bytes = 34190917632\npeak_flops = 209.5e12\nmem_bandwidth = 1.792e12\nlink_bandwidth = 64e9\nprice_per_hour = 0.9\n";
        let p = write(
            "dev.toml",
            &(BASE.replace("\"h100\"", "\"rtx5090\"") + custom),
        );
        let f = ExperimentFile::load(&p).unwrap();
        let e = &f.points[0].experiment;
        assert_eq!(
            resolve_device(&e.cluster, &e.devices).unwrap().peak_flops,
            209.5e12
        );
        let p = write(
            "dev-bad.toml",
            &(BASE.replace("\"h100\"", "\"rtx5090\"") + &custom.replace("209.5e12", "-1.0")),
        );
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("devices[0].peak_flops"), "{e}");
        for name in [
            "NVIDIA GeForce RTX 4090",
            "RTX4090",
            "rtx-pro-6000",
            "H100-80GB",
            "MI300X",
        ] {
            assert!(catalog::device(name).is_some(), "{name}");
        }
    }

    #[test]
    fn a_missing_trace_file_is_named() {
        let p = write(
            "t.toml",
            &BASE.replace(
                "lengths = { type = \"fixed\", prompt = 100, output = 10 }",
                "lengths = { type = \"trace\", path = \"nope.csv\" }",
            ),
        );
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("nope.csv"), "{e}");
    }

    #[test]
    fn a_sweep_past_1000_points_keeps_its_folders_in_point_order() {
        let values: Vec<String> = (1..=1001).map(|s| s.to_string()).collect();
        let p = write(
            "big.toml",
            &format!("{BASE}\n[sweep]\n\"seed\" = [{}]\n", values.join(", ")),
        );
        let f = ExperimentFile::load(&p).unwrap();
        assert_eq!(f.points[0].folder, "0000-seed=1");
        assert_eq!(f.points[1000].folder, "1000-seed=1001");
        let mut sorted: Vec<&str> = f.points.iter().map(|p| p.folder.as_str()).collect();
        sorted.sort_unstable();
        assert!(sorted.iter().zip(&f.points).all(|(s, p)| *s == p.folder));
        let p = write(
            "huge.toml",
            &format!(
                "{BASE}\n[sweep]\n\"seed\" = [{0}]\n\"workload.num_requests\" = [{0}]\n",
                values.join(", ")
            ),
        );
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("1002001 points") && e.contains("split"), "{e}");
    }

    #[test]
    fn a_sweep_value_that_is_not_an_array_is_rejected() {
        let p = write("s.toml", &format!("{BASE}\n[sweep]\n\"seed\" = 3\n"));
        let e = ExperimentFile::load(&p).unwrap_err().to_string();
        assert!(e.contains("sweep key `seed`") && e.contains("array"), "{e}");
    }
}
