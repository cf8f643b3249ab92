//! Model weights in the layout both backends run: each layer's Q, K and V projections stacked
//! into one matrix, gate and up stacked into another, read once from a checkpoint.

use crate::error::{EngineError, Result};
use crate::spec::ModelSpec;
use crate::weights::Checkpoint;
use std::path::Path;

/// One layer's weights, projections fused (the CUDA backend uploads the same layout).
pub(crate) struct FusedLayer {
    pub(crate) attn_norm: Vec<f32>,
    /// `[(heads + 2·kv_heads)·head_dim, hidden]`.
    pub(crate) qkv: Vec<f32>,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    /// `[hidden, heads·head_dim]`.
    pub(crate) o: Vec<f32>,
    pub(crate) mlp_norm: Vec<f32>,
    /// `[2·intermediate, hidden]`: gate rows then up rows.
    pub(crate) gate_up: Vec<f32>,
    /// `[hidden, intermediate]`.
    pub(crate) down: Vec<f32>,
}

/// Model weights on the host in the fused layout (QKV rows stacked, gate and up rows stacked)
/// that the CPU backend runs and the CUDA backend uploads.
pub struct FusedWeights {
    pub(crate) embed: Vec<f32>,
    /// `None` when tied to the embedding.
    pub(crate) lm_head: Option<Vec<f32>>,
    pub(crate) final_norm: Vec<f32>,
    pub(crate) layers: Vec<FusedLayer>,
}

impl FusedWeights {
    /// Loads the weights of the model folder `dir` for `spec`.
    ///
    /// # Errors
    /// A missing file or tensor, or a tensor whose shape differs from what `config.json` implies.
    pub fn load(dir: &Path, spec: &ModelSpec) -> Result<Self> {
        let mut ck = Checkpoint::load(dir)?;
        Self::from_checkpoint(&mut ck, spec)
    }

    /// Takes the weights out of a loaded checkpoint.
    ///
    /// # Errors
    /// As [`FusedWeights::load`].
    pub fn from_checkpoint(ck: &mut Checkpoint, spec: &ModelSpec) -> Result<Self> {
        let c = &spec.config;
        let (h, v, i) = (
            c.hidden_size as usize,
            c.vocab_size as usize,
            c.intermediate_size as usize,
        );
        let (q, kv) = (c.q_width() as usize, c.kv_width() as usize);
        let embed = ck.take("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if c.tie_word_embeddings || !ck.contains("lm_head.weight") {
            if !c.tie_word_embeddings {
                return Err(EngineError::Tensor {
                    name: "lm_head.weight".into(),
                    message: "missing, and config.json does not set tie_word_embeddings".into(),
                });
            }
            None
        } else {
            Some(ck.take("lm_head.weight", &[v, h])?)
        };
        let final_norm = ck.take("model.norm.weight", &[h])?;
        let mut layers = Vec::with_capacity(c.num_layers as usize);
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let mut qkv = ck.take(&format!("{p}.self_attn.q_proj.weight"), &[q, h])?;
            qkv.extend(ck.take(&format!("{p}.self_attn.k_proj.weight"), &[kv, h])?);
            qkv.extend(ck.take(&format!("{p}.self_attn.v_proj.weight"), &[kv, h])?);
            let qkv_bias = if c.attention_bias {
                let mut b = ck.take(&format!("{p}.self_attn.q_proj.bias"), &[q])?;
                b.extend(ck.take(&format!("{p}.self_attn.k_proj.bias"), &[kv])?);
                b.extend(ck.take(&format!("{p}.self_attn.v_proj.bias"), &[kv])?);
                Some(b)
            } else {
                None
            };
            let mut gate_up = ck.take(&format!("{p}.mlp.gate_proj.weight"), &[i, h])?;
            gate_up.extend(ck.take(&format!("{p}.mlp.up_proj.weight"), &[i, h])?);
            layers.push(FusedLayer {
                attn_norm: ck.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o: ck.take(&format!("{p}.self_attn.o_proj.weight"), &[h, q])?,
                mlp_norm: ck.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: ck.take(&format!("{p}.mlp.down_proj.weight"), &[h, i])?,
            });
        }
        Ok(FusedWeights {
            embed,
            lm_head,
            final_norm,
            layers,
        })
    }
}
