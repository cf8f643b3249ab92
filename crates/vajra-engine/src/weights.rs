//! Reading `*.safetensors` checkpoints (one file, or shards listed by
//! `model.safetensors.index.json`) into f32 tensors.
//!
//! f32, f16 and bf16 tensors are accepted; the CPU reference backend computes in f32, so f16 and
//! bf16 values are widened once at load (exactly: both convert to f32 without rounding). Every
//! tensor is checked against the shape the model expects before use.

use crate::error::{EngineError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A dense f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f32>,
}

/// All tensors of a checkpoint, by name.
#[derive(Debug, Default)]
pub struct Checkpoint {
    tensors: HashMap<String, Tensor>,
    files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Reads every safetensors file of the model folder `dir`.
    ///
    /// # Errors
    /// No `model.safetensors` and no index, an index naming a missing shard, a file that is not
    /// safetensors, or a tensor of another dtype than f32/f16/bf16.
    pub fn load(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text =
                std::fs::read_to_string(&index).map_err(|e| EngineError::model_file(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::model_file(&index, e))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::model_file(&index, "no `weight_map` object"))?;
            let shards: BTreeSet<&str> = map.values().filter_map(|s| s.as_str()).collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut ck = Checkpoint::default();
        for f in &files {
            if !f.exists() {
                return Err(EngineError::MissingFile {
                    path: f.clone(),
                    what: "model weights (safetensors)".into(),
                });
            }
            let bytes = std::fs::read(f).map_err(|e| EngineError::model_file(f, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| EngineError::model_file(f, e))?;
            for (name, view) in st.tensors() {
                let data =
                    to_f32(view.dtype(), view.data()).ok_or_else(|| EngineError::Tensor {
                        name: name.clone(),
                        message: format!(
                            "dtype {:?} in {} (allowed: F32, F16, BF16)",
                            view.dtype(),
                            f.display()
                        ),
                    })?;
                ck.tensors.insert(
                    name,
                    Tensor {
                        shape: view.shape().to_vec(),
                        data,
                    },
                );
            }
        }
        ck.files = files;
        Ok(ck)
    }

    /// The files read.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Whether a tensor exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns a tensor, checking its shape.
    ///
    /// # Errors
    /// The tensor is absent or has another shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| EngineError::Tensor {
                name: name.into(),
                message: format!("missing from {}", self.describe_files()),
            })?;
        if t.shape != shape {
            return Err(EngineError::Tensor {
                name: name.into(),
                message: format!("shape {:?}, expected {shape:?} from config.json", t.shape),
            });
        }
        Ok(t.data)
    }

    fn describe_files(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.display().to_string()).collect();
        names.join(", ")
    }
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let pairs = || {
        bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(pairs().map(|b| half::f16::from_bits(b).to_f32()).collect()),
        Dtype::BF16 => Some(pairs().map(|b| half::bf16::from_bits(b).to_f32()).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_and_f16_widen_exactly() {
        let v = [1.5f32, -0.25, 3.0];
        let bf: Vec<u8> = v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f: Vec<u8> = v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::BF16, &bf).unwrap(), v);
        assert_eq!(to_f32(Dtype::F16, &f).unwrap(), v);
        assert!(to_f32(Dtype::I64, &[0; 8]).is_none());
    }

    #[test]
    fn missing_weights_file_is_named() {
        let dir = std::env::temp_dir().join("vajra-engine-no-weights");
        std::fs::create_dir_all(&dir).unwrap();
        let e = Checkpoint::load(&dir).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("missing"),
            "{e}"
        );
    }
}
