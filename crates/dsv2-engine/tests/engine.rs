//! The engine loop on a small synthetic model: concurrent greedy requests equal the
//! single-sequence generator, prefix-cache hits show in usage, cancels free blocks,
//! the queue limit holds, and a drain ends the loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv2_backend::ComputeDtype;
use dsv2_core::{DType, ModelConfig};
use dsv2_cpu::CpuBackend;
use dsv2_engine::{
    Engine, EngineConfig, EngineError, EngineHandle, Event, FinishReason, Generator, Greedy,
    Request, RequestStream, TokenPicker, Usage,
};
use dsv2_model::synthetic::synthetic_checkpoint;
use dsv2_model::Model;

fn config() -> ModelConfig {
    let v = serde_json::json!({
        "model_type": "deepseek_v2", "vocab_size": 300, "hidden_size": 64,
        "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "q_lora_rank": null, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 2, "num_experts_per_tok": 3,
        "topk_method": "greedy", "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "eos_token_id": 299
    });
    ModelConfig::from_json_str(&v.to_string()).unwrap()
}

fn model() -> (CpuBackend, Model<CpuBackend>) {
    let backend = CpuBackend::new(ComputeDtype::F32);
    let config = config();
    let checkpoint = synthetic_checkpoint(&config, 7, DType::F32);
    let model = Model::load(&backend, config, &checkpoint).unwrap();
    (backend, model)
}

fn prompt(len: usize, seed: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 97)) % 290)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens: Some(max_tokens),
        stop_token_ids: vec![],
        picker: Box::new(Greedy),
        logprobs: None,
    }
}

/// Collects a stream's tokens and final event (bounded in time).
fn collect(mut stream: RequestStream) -> (Vec<u32>, FinishReason, Usage) {
    let mut tokens = Vec::new();
    let started = Instant::now();
    while let Some(event) = stream.blocking_next() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "request too slow"
        );
        match event {
            Event::Started { .. } => {}
            Event::Token { token_id, .. } => tokens.push(token_id),
            Event::Finished { reason, usage } => return (tokens, reason, usage),
            Event::Error { message } => panic!("request failed: {message}"),
        }
    }
    panic!("stream ended without Finished");
}

/// Runs `body` with an engine running on a scoped thread; drains it afterwards.
fn with_engine<R>(cfg: EngineConfig, body: impl FnOnce(&EngineHandle) -> R) -> R {
    with_engine_after(cfg, |_| (), |h, ()| body(h))
}

/// [`with_engine`], with `before` run on the handle before the engine thread starts
/// (requests it submits are all queued when the first step is scheduled); its result
/// goes to `body`.
fn with_engine_after<B, R>(
    cfg: EngineConfig,
    before: impl FnOnce(&EngineHandle) -> B,
    body: impl FnOnce(&EngineHandle, B) -> R,
) -> R {
    let (backend, model) = model();
    let (engine, handle) = Engine::new(&backend, &model, cfg).unwrap();
    let prepared = before(&handle);
    std::thread::scope(|s| {
        let runner = s.spawn(move || engine.run());
        // Drain even when the body fails, so a failed assertion fails the test instead
        // of leaving the scope waiting for the engine forever.
        let out =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&handle, prepared)));
        handle.drain(Instant::now() + Duration::from_secs(30));
        runner.join().unwrap();
        out.unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn solo_greedy(prompt: &[u32], max_tokens: usize) -> Vec<u32> {
    let (backend, model) = model();
    let mut generator = Generator::new(&backend, &model, 512).unwrap();
    generator
        .generate(prompt, max_tokens, &[], &mut Greedy, &mut |_| true)
        .unwrap()
        .token_ids
}

#[test]
fn concurrent_greedy_requests_equal_solo_runs() {
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| prompt(5 + 7 * i, i as u32)).collect();
    let solo: Vec<Vec<u32>> = prompts.iter().map(|p| solo_greedy(p, 12)).collect();
    // A small token budget forces chunked prefill next to decodes.
    let cfg = EngineConfig {
        max_num_batched_tokens: 16,
        max_num_seqs: 8,
        ..EngineConfig::default()
    };
    let outs = with_engine(cfg, |h| {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| h.submit(request(p.clone(), 12)).unwrap())
            .collect();
        streams.into_iter().map(collect).collect::<Vec<_>>()
    });
    for (i, (tokens, reason, usage)) in outs.into_iter().enumerate() {
        assert_eq!(tokens, solo[i], "request {i}");
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.prompt_tokens, prompts[i].len());
        assert_eq!(usage.completion_tokens, 12);
    }
}

/// The cache is sized from its byte budget at the backend's value size: a bf16 latent
/// cache holds twice the blocks of an f32 one in the same budget.
#[test]
fn a_bf16_cache_holds_twice_the_blocks_in_the_same_budget() {
    let (backend, model) = model();
    let f32_block = dsv2_backend::Backend::cache_bytes(&backend, model.cache_spec(1, 16));
    drop((backend, model));
    let blocks = |cache: ComputeDtype| {
        let backend = CpuBackend::new(ComputeDtype::F32).with_cache_dtype(cache);
        let config = config();
        let checkpoint = synthetic_checkpoint(&config, 7, DType::F32);
        let model = Model::load(&backend, config, &checkpoint).unwrap();
        let cfg = EngineConfig {
            kv_cache_bytes: 100 * f32_block,
            ..EngineConfig::default()
        };
        let (engine, handle) = Engine::new(&backend, &model, cfg).unwrap();
        let total = handle.stats().blocks_total;
        drop(engine);
        total
    };
    let (f32_blocks, bf16_blocks) = (blocks(ComputeDtype::F32), blocks(ComputeDtype::Bf16));
    assert_eq!((f32_blocks, bf16_blocks), (100, 200));
}

#[test]
fn preemption_under_a_tiny_cache_still_finishes_every_request() {
    // Room for ~12 blocks of 16 tokens: eight 40-token requests cannot all run.
    let (backend, model) = model();
    let per_block = dsv2_backend::Backend::cache_bytes(&backend, model.cache_spec(1, 16));
    let cfg = EngineConfig {
        kv_cache_bytes: per_block * 12,
        ..EngineConfig::default()
    };
    drop((backend, model));
    // All eight are queued before the engine's first step: submitted while it runs, a
    // descheduled test thread (CI runs tests side by side on 2 cores) could let the
    // first requests finish before the last arrive, and nothing would be preempted.
    let outs = with_engine_after(
        cfg,
        |h| {
            (0..8)
                .map(|i| h.submit(request(prompt(20, 100 + i), 20)).unwrap())
                .collect::<Vec<_>>()
        },
        |h, streams| {
            let outs: Vec<_> = streams.into_iter().map(collect).collect();
            assert!(
                h.stats().num_preemptions > 0,
                "the cache should force preemption"
            );
            outs
        },
    );
    for (tokens, reason, _) in outs {
        assert_eq!(tokens.len(), 20);
        assert_eq!(reason, FinishReason::Length);
    }
}

#[test]
fn repeated_prompt_hits_the_prefix_cache() {
    let p = prompt(40, 3);
    let (first, second) = with_engine(EngineConfig::default(), |h| {
        let first = collect(h.submit(request(p.clone(), 4)).unwrap());
        let second = collect(h.submit(request(p.clone(), 4)).unwrap());
        (first, second)
    });
    assert_eq!(first.2.cached_tokens, 0);
    // 40 tokens = 2 full blocks of 16 + 8: both full blocks are reused.
    assert_eq!(second.2.cached_tokens, 32);
    assert_eq!(first.0, second.0);
}

/// Greedy, but each token after the first waits until `open` is set: a request held by
/// it keeps its blocks for as long as the test needs, however the threads are scheduled.
struct Gated {
    open: Arc<AtomicBool>,
}

impl TokenPicker for Gated {
    fn pick(&mut self, logits: &[f32], generated: &[u32]) -> u32 {
        if !generated.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !self.open.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "the gate was never opened");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Greedy.pick(logits, generated)
    }
}

#[test]
fn dropping_a_stream_frees_its_blocks() {
    with_engine(EngineConfig::default(), |h| {
        let open = Arc::new(AtomicBool::new(false));
        let mut req = request(prompt(30, 9), 400);
        req.picker = Box::new(Gated { open: open.clone() });
        let mut stream = h.submit(req).unwrap();
        // Wait for the first token, then walk away. The second is held at the gate, so
        // the request is still running (it could otherwise finish its 400 tokens while
        // this thread is descheduled, and nothing would be left to free).
        loop {
            match stream.blocking_next() {
                Some(Event::Token { .. }) => break,
                Some(_) => {}
                None => panic!("stream ended early"),
            }
        }
        // Metrics are published at the end of each step, just after its tokens are sent.
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.stats().blocks_used == 0 {
            assert!(Instant::now() < deadline, "no blocks in use");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(stream);
        open.store(true, Ordering::Release);
        let deadline = Instant::now() + Duration::from_secs(10);
        while h.stats().blocks_used > 0 || h.stats().num_running > 0 {
            assert!(Instant::now() < deadline, "blocks not freed");
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

#[test]
fn validation_and_queue_limit() {
    let cfg = EngineConfig {
        max_waiting: 2,
        max_num_seqs: 1,
        max_model_len: Some(64),
        ..EngineConfig::default()
    };
    // Everything is submitted before the engine's first step, so no request is admitted
    // (and leaves the queue) while the test fills it, however the threads are scheduled.
    let submit_all = |h: &EngineHandle| {
        assert!(matches!(
            h.submit(request(vec![], 4)),
            Err(EngineError::Request(_))
        ));
        assert!(matches!(
            h.submit(request(vec![1, 300], 4)),
            Err(EngineError::Request(_))
        ));
        let err = h.submit(request(prompt(64, 1), 4)).unwrap_err();
        assert!(err.to_string().contains("64"), "{err}");
        let mut streams = Vec::new();
        let mut refused = 0;
        for i in 0..20 {
            match h.submit(request(prompt(10, i), 40)) {
                Ok(s) => streams.push(s),
                Err(EngineError::QueueFull { max_waiting }) => {
                    assert_eq!(max_waiting, 2);
                    refused += 1;
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        (streams, refused)
    };
    with_engine_after(cfg, submit_all, |_, (streams, refused)| {
        assert_eq!((streams.len(), refused), (2, 18));
        // The two queued requests run to the end.
        for stream in streams {
            let (tokens, reason, _) = collect(stream);
            assert_eq!((tokens.len(), reason), (40, FinishReason::Length));
        }
    });
}

#[test]
fn logprobs_are_reported_when_asked() {
    let (tokens, _, _) = with_engine(EngineConfig::default(), |h| {
        let mut req = request(prompt(8, 5), 3);
        req.logprobs = Some(4);
        let mut stream = h.submit(req).unwrap();
        let mut got = Vec::new();
        while let Some(e) = stream.blocking_next() {
            if let Event::Token { token_id, logprobs } = e {
                let lp = logprobs.expect("logprobs");
                assert_eq!(lp.top.len(), 4);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0].0, token_id);
                assert_eq!(lp.top[0].1, lp.logprob);
                got.push(token_id);
            }
        }
        (got, FinishReason::Length, Usage::default())
    });
    assert_eq!(tokens.len(), 3);
}
