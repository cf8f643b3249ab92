//! Named model shapes (Hugging Face `config.json` text) for benchmarks and profiles that need a
//! model's shape but not its weights (random weights are made on the device).

/// `(name, config.json)` of the shapes the engine knows by name.
pub const SHAPES: &[(&str, &str)] = &[
    (
        "Meta-Llama-3-8B",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":14336,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":8,"vocab_size":128256,"max_position_embeddings":8192,
           "rope_theta":500000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"bfloat16","eos_token_id":128001,"bos_token_id":128000}"#,
    ),
    (
        "Llama-2-7b-hf",
        r#"{"model_type":"llama","hidden_size":4096,"intermediate_size":11008,"num_attention_heads":32,
           "num_hidden_layers":32,"num_key_value_heads":32,"vocab_size":32000,"max_position_embeddings":4096,
           "rope_theta":10000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":false,
           "torch_dtype":"float16","eos_token_id":2,"bos_token_id":1}"#,
    ),
    (
        "SmolLM2-135M",
        r#"{"model_type":"llama","hidden_size":576,"intermediate_size":1536,"num_attention_heads":9,
           "num_hidden_layers":30,"num_key_value_heads":3,"vocab_size":49152,"max_position_embeddings":8192,
           "rope_theta":100000.0,"rms_norm_eps":1e-05,"hidden_act":"silu","tie_word_embeddings":true,
           "torch_dtype":"bfloat16","eos_token_id":2,"bos_token_id":1}"#,
    ),
];

/// The spec of a named shape.
///
/// # Errors
/// An unknown name (the message lists the known ones).
pub fn named(name: &str) -> crate::Result<crate::spec::ModelSpec> {
    let (n, json) = SHAPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| {
            let known: Vec<&str> = SHAPES.iter().map(|s| s.0).collect();
            crate::EngineError::invalid("shape", name, known.join(", "))
        })?;
    crate::spec::ModelSpec::from_json(json, n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_named_shape_parses_and_has_its_parameter_count() {
        let l3 = super::named("meta-llama-3-8b").unwrap();
        assert_eq!(l3.config.num_params() / 1_000_000, 8030);
        for (n, _) in super::SHAPES {
            super::named(n).unwrap();
        }
        assert!(
            super::named("gpt-5")
                .unwrap_err()
                .to_string()
                .contains("Llama-2-7b-hf")
        );
    }
}
