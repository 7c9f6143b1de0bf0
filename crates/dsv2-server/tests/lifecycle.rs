//! The server's life cycle in-process on the built-in model's architecture (tiny random
//! weights): 503 while loading, 200 once the engine runs, and a drain that ends
//! `run_engine` and stops the HTTP server. Plain HTTP/1.1 over a loopback socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use dsv2_backend::ComputeDtype;
use dsv2_core::{DType, ModelConfig, Tokenizer};
use dsv2_cpu::CpuBackend;
use dsv2_engine::EngineConfig;
use dsv2_model::synthetic::synthetic_checkpoint;
use dsv2_model::Model;
use dsv2_server::{Server, ServerConfig, TextModel};

/// One request on a fresh connection: (status, body).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    try_request(addr, method, path, body).unwrap()
}

/// Like [`request`], but a refused or reset connection is an `Err`.
fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

fn tiny_model() -> (CpuBackend, Model<CpuBackend>) {
    // The built-in tokenizer's ids go up to ~100k: a vocabulary that holds them.
    let v = serde_json::json!({
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "q_lora_rank": null, "kv_lora_rank": 8, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 8, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "eos_token_id": 100001
    });
    let config = ModelConfig::from_json_str(&v.to_string()).unwrap();
    let backend = CpuBackend::new(ComputeDtype::F32);
    let checkpoint = synthetic_checkpoint(&config, 3, DType::F32);
    let model = Model::load(&backend, config, &checkpoint).unwrap();
    (backend, model)
}

#[test]
fn loading_ready_and_drained() {
    let config = ServerConfig {
        port: 0,
        drain_timeout: Duration::from_secs(10),
        ..ServerConfig::default()
    };
    let server = Server::start(config).unwrap();
    let addr = server.local_addr();
    let state = server.state();
    // Loading: health 503, generation 503 with Retry-After.
    let (status, body) = request(addr, "GET", "/health", "");
    assert_eq!((status, body.as_str()), (503, r#"{"status":"loading"}"#));
    let chat =
        r#"{"model":"deepseek-chat","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let (status, body) = request(addr, "POST", "/v1/chat/completions", chat);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("loading"));

    let (backend, model) = tiny_model();
    let text = TextModel::new(
        Tokenizer::builtin().unwrap(),
        None,
        &[100001],
        "tiny".into(),
    );
    let engine = EngineConfig {
        kv_cache_bytes: 1 << 20,
        ..EngineConfig::default()
    };
    std::thread::scope(|s| {
        let runner = s.spawn(|| server.run_engine(&backend, &model, text, engine));
        let deadline = Instant::now() + Duration::from_secs(30);
        while request(addr, "GET", "/health", "").0 != 200 {
            assert!(Instant::now() < deadline, "never became ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (status, body) = request(addr, "POST", "/v1/chat/completions", chat);
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["usage"]["completion_tokens"], 3);
        assert!(state.drain());
        // Draining with nothing running ends at once: health answers 503 while the
        // server is still up, and then the server is gone.
        if let Ok((status, _)) = try_request(addr, "GET", "/health", "") {
            assert_eq!(status, 503);
        }
        runner.join().unwrap().unwrap();
    });
    // The HTTP server is gone.
    assert!(TcpStream::connect(addr).is_err());
}
