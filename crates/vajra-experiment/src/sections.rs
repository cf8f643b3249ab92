//! An experiment file read section by section, every section optional: what the engine's
//! `serve --experiment` and `bench` read. The sections are the very types of [`Experiment`]
//! (crate::Experiment), so a key the simulator rejects is rejected here too, with its line;
//! a section the command needs and the file lacks is named by [`Sections::require`].

use crate::error::{ExperimentError, Result};
use crate::experiment::{CapacityConfig, ClusterSpec, DEFAULT_SEED, ModelSpec, OutputConfig};
use crate::predictor::PredictorConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use vajra_core::config::CacheConfig;
use vajra_core::router::RouterConfig;
use vajra_core::sched::config::SchedulerConfig;
use vajra_metrics::SloConfig;
use vajra_workload::WorkloadConfig;

/// Every top-level key of an experiment file, each optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sections {
    /// The file (set by [`Sections::load`]).
    #[serde(skip)]
    pub path: PathBuf,
    /// `name`.
    pub name: Option<String>,
    /// `seed`.
    pub seed: Option<u64>,
    /// `[model]`.
    pub model: Option<ModelSpec>,
    /// `[cluster]`.
    pub cluster: Option<ClusterSpec>,
    /// `[scheduler]`.
    pub scheduler: Option<SchedulerConfig>,
    /// `[router]`.
    pub router: Option<RouterConfig>,
    /// `[cache]`.
    pub cache: Option<CacheConfig>,
    /// `[predictor]`.
    pub predictor: Option<PredictorConfig>,
    /// `[workload]`.
    pub workload: Option<WorkloadConfig>,
    /// `[slo]`.
    pub slo: Option<SloConfig>,
    /// `[output]`.
    pub output: Option<OutputConfig>,
    /// `[capacity]`.
    pub capacity: Option<CapacityConfig>,
    /// `[sweep]`: read only to refuse it (one command, one point).
    sweep: Option<toml::Table>,
}

impl Sections {
    /// Reads an experiment file of one point and checks every section it has.
    ///
    /// # Errors
    /// An unreadable file, malformed TOML, an unknown key (with its line), an invalid value, or
    /// a `[sweep]` (the message says how to take one point of it).
    pub fn load(path: &Path) -> Result<Self> {
        let file_err = |message: String| ExperimentError::File {
            path: path.to_owned(),
            message,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
        let mut s: Sections = toml::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        if let Some(sweep) = &s.sweep {
            let keys: Vec<&str> = sweep.keys().map(String::as_str).collect();
            return Err(file_err(format!(
                "has a [sweep] ({}), and this command takes one point: run `vajra-sim run` on \
                 the file and pass one point's config.resolved.toml",
                keys.join(", ")
            )));
        }
        s.path = path.to_owned();
        if let Some(c) = &s.scheduler {
            c.validate()?;
        }
        if let Some(c) = &s.router {
            c.validate()?;
        }
        if let Some(c) = &s.cache {
            c.validate()?;
        }
        if let Some(c) = &s.predictor {
            c.validate()?;
        }
        if let Some(c) = &s.workload {
            c.validate()?;
        }
        if let Some(c) = &s.slo {
            c.validate()?;
        }
        Ok(s)
    }

    /// The root seed: the file's, else the simulator's default.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(DEFAULT_SEED)
    }

    /// The folder relative input paths (traces) are read from.
    pub fn base(&self) -> &Path {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        }
    }

    /// A section the command cannot do without.
    ///
    /// # Errors
    /// The section is absent: the message names it and the file.
    pub fn require<'a, T>(&self, section: &'a Option<T>, name: &str) -> Result<&'a T> {
        section.as_ref().ok_or_else(|| ExperimentError::File {
            path: self.path.clone(),
            message: format!("has no [{name}], which this command needs"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, body: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vajra-sections-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn a_partial_file_reads_with_the_simulators_defaults() {
        let p = write(
            "part.toml",
            "[scheduler]\npolicy = { type = \"sarathi\", chunk_size = 64 }\n",
        );
        let s = Sections::load(&p).unwrap();
        assert_eq!(s.seed(), 42);
        assert!(s.workload.is_none() && s.cache.is_none());
        let e = s.require(&s.workload, "workload").unwrap_err().to_string();
        assert!(e.contains("part.toml") && e.contains("[workload]"), "{e}");
    }

    #[test]
    fn a_misspelt_key_anywhere_is_named_with_its_line() {
        let p = write("typo.toml", "seed = 1\n[cache]\nblok_size = 16\n");
        let e = Sections::load(&p).unwrap_err().to_string();
        assert!(e.contains("blok_size") && e.contains("line 3"), "{e}");
        let p = write("top.toml", "sched = 1\n");
        let e = Sections::load(&p).unwrap_err().to_string();
        assert!(e.contains("sched") && e.contains("scheduler"), "{e}");
    }

    #[test]
    fn a_bad_value_and_a_sweep_are_refused() {
        let p = write("bad.toml", "[slo]\nttft_s = -1.0\n");
        let e = Sections::load(&p).unwrap_err().to_string();
        assert!(e.contains("ttft"), "{e}");
        let p = write("sw.toml", "[sweep]\n\"seed\" = [1, 2]\n");
        let e = Sections::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("[sweep] (seed)") && e.contains("config.resolved.toml"),
            "{e}"
        );
    }
}
