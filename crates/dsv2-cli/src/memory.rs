//! Whether a model's weights fit this machine's memory on the CPU, checked before loading.
//!
//! A quantized model (`--quantize`, a `dsv2 quantize` checkpoint) and random bench weights
//! live in anonymous memory, which cannot be paged back to the file: if they exceed the
//! machine's memory the load ends, minutes later, in the kernel's out-of-memory kill, so
//! that is an error up front. A dense checkpoint is read through its file mapping: larger
//! than memory, it still runs, its expert pages read from disk again and again, so that is
//! a warning with the quantized sizes that would fit.

use anyhow::{bail, Result};
use dsv2_core::quant::{dense_streamed_matrix, quantized_format, QuantFormat};
use dsv2_core::{expected_tensors, DType, ModelConfig};

/// How one tensor is held before the CPU backend loads it.
#[derive(Clone, Debug)]
pub enum Held {
    /// A window into a checkpoint's file mapping, in this dtype.
    Mapped(DType),
    /// Bytes made in memory (random or built-in weights), in this dtype.
    InMemory(DType),
    /// Planes of a `dsv2 quantize` checkpoint in this format.
    Quantized(QuantFormat),
}

/// The bytes a loaded model's weights keep on the CPU backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightMemory {
    /// Copied or made in memory: quantized planes, the dense matrices a quantized model
    /// streams every step (copied into huge pages), weights made in memory.
    pub anonymous: u64,
    /// File pages of the checkpoint, used in place: the kernel may drop them and read
    /// them again.
    pub mapped: u64,
}

fn dense_bytes(shape: &[usize], dtype: &DType) -> u64 {
    (shape.iter().product::<usize>() * dtype.size().unwrap_or(0)) as u64
}

/// What the CPU backend keeps of `tensors` (name, shape, how it is held), quantized at
/// load to `quantize` where eligible: the rules of `Model::load_from` and `CpuBackend`.
pub fn weight_memory<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize], Held)>,
    quantize: Option<QuantFormat>,
) -> WeightMemory {
    let tensors: Vec<_> = tensors.into_iter().collect();
    let quantized_model = quantize.is_some()
        || tensors
            .iter()
            .any(|(_, _, h)| matches!(h, Held::Quantized(_)));
    let mut memory = WeightMemory::default();
    for (name, shape, held) in tensors {
        match held {
            Held::Quantized(format) => {
                memory.anonymous += format.matrix_bytes(shape[0], shape[1]) as u64
            }
            Held::Mapped(ref dtype) | Held::InMemory(ref dtype) => {
                if let Some(format) = quantize.and_then(|q| quantized_format(name, shape, q)) {
                    memory.anonymous += format.matrix_bytes(shape[0], shape[1]) as u64;
                } else if matches!(held, Held::InMemory(_))
                    || (quantized_model && dense_streamed_matrix(name, shape))
                {
                    memory.anonymous += dense_bytes(shape, dtype);
                } else {
                    memory.mapped += dense_bytes(shape, dtype);
                }
            }
        }
    }
    memory
}

/// What this process may hold: memory (`MemTotal`, or the cgroup's limit where lower)
/// and swap (`SwapTotal`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory: u64,
    pub swap: u64,
}

/// This process's [`Limits`]; `None` where `/proc/meminfo` cannot be read (not Linux).
pub fn limits() -> Option<Limits> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    let cgroup = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok());
    let total = field("MemTotal:")?;
    Some(Limits {
        memory: cgroup.map_or(total, |c| c.min(total)),
        swap: field("SwapTotal:").unwrap_or(0),
    })
}

fn gb(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// Fails when the anonymous part and `cache` (the KV cache a server will fill, 0
/// elsewhere) exceed memory and swap together; returns a warning when they and the mapped
/// part exceed memory. `what` names the model in the messages; `quantized_sizes` gives
/// the weights' bytes at q8 and at q4, for the advice.
pub fn check(
    what: &str,
    memory: WeightMemory,
    cache: u64,
    limits: Limits,
    quantized_sizes: (u64, u64),
) -> Result<Option<String>> {
    let (q8, q4) = quantized_sizes;
    let room = limits.memory + limits.swap;
    let needs = if cache > 0 {
        format!(
            "its weights need {} and its KV cache {} of memory on the CPU",
            gb(memory.anonymous),
            gb(cache)
        )
    } else {
        format!(
            "its weights need {} of memory on the CPU",
            gb(memory.anonymous)
        )
    };
    if memory.anonymous + cache > room {
        let advice = if q4 < memory.anonymous && q4 + cache <= limits.memory {
            format!(" (q4 would keep {})", gb(q4))
        } else if cache > 0 && memory.anonymous < room {
            " (a smaller --kv-cache-memory)".to_string()
        } else {
            String::new()
        };
        let has = if limits.swap > 0 {
            format!(
                "{} of memory and {} of swap",
                gb(limits.memory),
                gb(limits.swap)
            )
        } else {
            gb(limits.memory)
        };
        bail!("{what}: {needs} and this machine has {has}: it would be killed for lack of memory{advice}");
    }
    if memory.anonymous + memory.mapped + cache > limits.memory {
        let cache_part = if cache > 0 {
            format!(" (and {} of KV cache)", gb(cache))
        } else {
            String::new()
        };
        return Ok(Some(format!(
            "dsv2: {what}: its weights take {}{cache_part} and this machine has {} of memory: \
             the pages of the experts a step needs will be read from disk or swap again and \
             again (slow); --quantize q8 keeps {} in memory, --quantize q4 {}",
            gb(memory.anonymous + memory.mapped),
            gb(limits.memory),
            gb(q8),
            gb(q4)
        )));
    }
    Ok(None)
}

/// Checks, before a CPU load, that the weights of `config` and `cache` bytes of KV cache
/// fit this machine's memory (`held` says how each tensor is held, `quantize` is
/// `--quantize`): an error when they cannot, a warning on stderr when a dense checkpoint
/// will be read from disk again and again. Nothing where the limits cannot be read.
pub fn check_before_load(
    what: &str,
    config: &ModelConfig,
    held: impl Fn(&str) -> Result<Held>,
    quantize: Option<QuantFormat>,
    cache: u64,
) -> Result<()> {
    let Some(limits) = limits() else {
        return Ok(());
    };
    let tensors = expected_tensors(config)
        .into_iter()
        .map(|t| Ok((held(&t.name)?, t)))
        .collect::<Result<Vec<_>>>()?;
    let memory_at = |q: Option<QuantFormat>| {
        weight_memory(
            tensors
                .iter()
                .map(|(h, t)| (t.name.as_str(), t.shape.as_slice(), h.clone())),
            q,
        )
    };
    let total = |m: WeightMemory| m.anonymous + m.mapped;
    let sizes = (
        total(memory_at(Some(QuantFormat::Q8))),
        total(memory_at(Some(QuantFormat::Q4))),
    );
    if let Some(warning) = check(what, memory_at(quantize), cache, limits, sizes)? {
        eprintln!("{warning}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lite_like() -> Vec<(String, Vec<usize>)> {
        vec![
            ("model.embed_tokens.weight".into(), vec![1000, 64]),
            ("model.layers.0.input_layernorm.weight".into(), vec![64]),
            (
                "model.layers.0.self_attn.kv_b_proj.weight".into(),
                vec![256, 32],
            ),
            (
                "model.layers.0.self_attn.o_proj.weight".into(),
                vec![64, 128],
            ),
            ("model.layers.1.mlp.gate.weight".into(), vec![8, 64]),
            (
                "model.layers.1.mlp.experts.0.up_proj.weight".into(),
                vec![96, 64],
            ),
            ("lm_head.weight".into(), vec![1000, 64]),
        ]
    }

    fn memory(held: impl Fn(&str) -> Held, quantize: Option<QuantFormat>) -> WeightMemory {
        let tensors = lite_like();
        weight_memory(
            tensors
                .iter()
                .map(|(n, s)| (n.as_str(), s.as_slice(), held(n))),
            quantize,
        )
    }

    #[test]
    fn a_dense_checkpoint_is_mapped_and_random_weights_are_in_memory() {
        let params = 64_000 + 64 + 256 * 32 + 64 * 128 + 8 * 64 + 96 * 64 + 64_000;
        let mapped = memory(|_| Held::Mapped(DType::BF16), None);
        assert_eq!(
            mapped,
            WeightMemory {
                anonymous: 0,
                mapped: 2 * params
            }
        );
        let random = memory(|_| Held::InMemory(DType::F32), None);
        assert_eq!(
            random,
            WeightMemory {
                anonymous: 4 * params,
                mapped: 0
            }
        );
    }

    #[test]
    fn quantizing_counts_planes_and_the_streamed_dense_matrices() {
        // q8: o_proj and the expert quantized (8.5 bits); lm_head, kv_b and the router
        // stay bf16 in huge pages; the embeddings and the norm stay mapped.
        let q8 = memory(|_| Held::Mapped(DType::BF16), Some(QuantFormat::Q8));
        let planes = 64 * 128 + 64 * 128 / 16 + 96 * 64 + 96 * 64 / 16;
        let streamed = 2 * (64_000 + 256 * 32 + 8 * 64);
        assert_eq!(
            q8,
            WeightMemory {
                anonymous: planes + streamed,
                mapped: 2 * (64_000 + 64)
            }
        );
        // q4: the routed expert at 4.5 bits, lm_head at q8.
        let q4 = memory(|_| Held::Mapped(DType::BF16), Some(QuantFormat::Q4));
        let planes = 64 * 128 + 64 * 128 / 16 + 96 * 32 + 96 * 64 / 16 + 64_000 + 4_000;
        let streamed = 2 * (256 * 32 + 8 * 64);
        assert_eq!(
            q4,
            WeightMemory {
                anonymous: planes + streamed,
                mapped: 2 * (64_000 + 64)
            }
        );
        // A checkpoint written by `dsv2 quantize` keeps the same bytes.
        let from_file = memory(
            |n| match quantized_format(n, &shape_of(n), QuantFormat::Q4) {
                Some(f) => Held::Quantized(f),
                None => Held::Mapped(DType::BF16),
            },
            None,
        );
        assert_eq!(from_file, q4);
    }

    fn shape_of(name: &str) -> Vec<usize> {
        lite_like().into_iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn too_large_in_memory_is_an_error_and_too_large_mapped_a_warning() {
        let limits = |memory, swap| Limits { memory, swap };
        let q = (900, 500);
        let err = check(
            "V2",
            WeightMemory {
                anonymous: 1_000,
                mapped: 0,
            },
            0,
            limits(800, 0),
            q,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("need 0.0 GB"), "{err}");
        assert!(err.contains("q4 would keep"), "{err}");
        let big = 40_000_000_000;
        let gb24 = 24_000_000_000;
        let err = check(
            "V2",
            WeightMemory {
                anonymous: big,
                mapped: 0,
            },
            0,
            limits(gb24, 0),
            (big, big),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "V2: its weights need 40.0 GB of memory on the CPU and this machine has 24.0 GB: \
             it would be killed for lack of memory"
        );
        let err = check(
            "V2",
            WeightMemory {
                anonymous: big,
                mapped: 0,
            },
            0,
            limits(gb24, 8_000_000_000),
            (big, big),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("has 24.0 GB of memory and 8.0 GB of swap"),
            "{err}"
        );
        // What swap can hold loads, with the warning.
        let warning = check(
            "V2",
            WeightMemory {
                anonymous: big,
                mapped: 0,
            },
            0,
            limits(gb24, 20_000_000_000),
            (big, big),
        )
        .unwrap()
        .unwrap();
        assert!(warning.contains("read from disk or swap"), "{warning}");
        let warning = check(
            "lite",
            WeightMemory {
                anonymous: 0,
                mapped: 31_400_000_000,
            },
            0,
            limits(gb24, 0),
            (17_000_000_000, 9_900_000_000),
        )
        .unwrap()
        .unwrap();
        assert!(
            warning.contains("take 31.4 GB and this machine has 24.0 GB of memory"),
            "{warning}"
        );
        assert!(
            warning.contains("q8 keeps 17.0 GB in memory, --quantize q4 9.9 GB"),
            "{warning}"
        );
        // A server's KV cache counts beside the weights.
        let q8 = WeightMemory {
            anonymous: 17_100_000_000,
            mapped: 400_000_000,
        };
        let err = check(
            "lite",
            q8,
            12_000_000_000,
            limits(gb24, 0),
            (17_500_000_000, 10_000_000_000),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "lite: its weights need 17.1 GB and its KV cache 12.0 GB of memory on the CPU and \
             this machine has 24.0 GB: it would be killed for lack of memory (q4 would keep \
             10.0 GB)"
        );
        let err = check(
            "lite",
            q8,
            16_000_000_000,
            limits(gb24, 0),
            (17_500_000_000, 17_500_000_000),
        )
        .unwrap_err()
        .to_string();
        assert!(err.ends_with("(a smaller --kv-cache-memory)"), "{err}");
        let warning = check("lite", q8, 6_700_000_000, limits(gb24, 0), (0, 0))
            .unwrap()
            .unwrap();
        assert!(
            warning.contains("take 17.5 GB (and 6.7 GB of KV cache)"),
            "{warning}"
        );
        assert!(check("lite", q8, 1_000_000_000, limits(gb24, 0), (0, 0))
            .unwrap()
            .is_none());
        assert!(check(
            "lite",
            WeightMemory {
                anonymous: 9,
                mapped: 10
            },
            0,
            limits(20, 0),
            q
        )
        .unwrap()
        .is_none());
    }
}
