//! Models by Hugging Face hub id: `deepseek-ai/DeepSeek-V2-Lite-Chat` resolves to a local
//! snapshot folder in the standard HF cache, downloading what is missing.
//!
//! - Cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//!   else `~/.cache/huggingface/hub`; layout `models--owner--name/{refs,blobs,snapshots}`,
//!   shared with Python's `huggingface_hub`.
//! - `HF_TOKEN` (else the token file `huggingface-cli login` writes) authenticates;
//!   `HF_ENDPOINT` changes the server.
//! - `HF_HUB_OFFLINE=1` reads the cache only.
//! - Downloads show progress bars and resume from `.part` files after an interruption.
//!   Files already in the snapshot are used without contacting the server.
//!
//! A folder that exists is always used as is (local folders keep working).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{CoreError, Result};

/// Files that a tokenizer needs (the first is required).
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];
const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_WEIGHTS_FILE: &str = "model.safetensors";

/// Which files of a repository [`resolve_model_with`] fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFiles {
    /// config.json, tokenizer files, generation_config.json, the index and every shard.
    All,
    /// config.json and the tokenizer files only (for `dsv2 tokenize`): no weights.
    TokenizerOnly,
}

/// Where hub models come from and go to. [`HubOptions::from_env`] reads the standard
/// `HF_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder (the one holding `models--owner--name` folders).
    pub cache_dir: PathBuf,
    /// Server URL, `https://huggingface.co` by default.
    pub endpoint: String,
    /// Access token for gated or private repositories.
    pub token: Option<String>,
    /// Read the cache only (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubOptions {
    /// Options from the environment: `HF_HUB_CACHE`, `HF_HOME`, `XDG_CACHE_HOME`,
    /// `HF_ENDPOINT`, `HF_TOKEN` / `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok(), home_dir())
    }

    /// [`from_env`](Self::from_env) over any variable lookup (testable without touching the
    /// process environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, home: Option<PathBuf>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let hf_home = var("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = var("HF_TOKEN").or_else(|| {
            let path = var("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true")
        });
        HubOptions {
            cache_dir,
            endpoint: var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into()),
            token,
            offline,
            progress: true,
        }
    }
}

fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .or_else(|| std::env::var_os("USERPROFILE"))
        .map(PathBuf::from)
}

/// What a `--model` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An existing local folder.
    Local(PathBuf),
    /// A hub repository `owner/name`, at a revision (`owner/name@rev`; default `main`).
    Hub {
        /// `owner/name`.
        repo_id: String,
        /// Branch, tag or commit hash.
        revision: String,
    },
}

/// Classifies a `--model` argument: an existing folder, else a hub id `owner/name[@rev]`;
/// anything else is an error that says what was expected.
pub fn parse_model_spec(spec: &str) -> Result<ModelSource> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(ModelSource::Local(path.to_path_buf()));
    }
    let bad = |problem: String| CoreError::ModelSpec {
        spec: spec.to_string(),
        problem,
    };
    if path.exists() {
        return Err(bad("is a file, not a model folder or hub id".into()));
    }
    let (repo_id, revision) = match spec.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, rev),
        Some(_) => return Err(bad("empty revision after `@`".into())),
        None => (spec, "main"),
    };
    if is_repo_id(repo_id) {
        Ok(ModelSource::Hub {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        })
    } else {
        Err(bad(
            "no such folder, and not a hub id of the form `owner/name`".into(),
        ))
    }
}

/// `owner/name`: two non-empty parts of ASCII letters, digits, `-`, `_`, `.`; no `--` or
/// `..`, not starting or ending with `-` or `.` (the hub's rules).
fn is_repo_id(s: &str) -> bool {
    let Some((owner, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.contains("--")
            && !p.contains("..")
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    part_ok(owner) && part_ok(name)
}

/// Resolves a `--model` argument to a local folder with config, tokenizer and weights:
/// an existing folder as is, a hub id through the HF cache (downloading what is missing
/// unless `HF_HUB_OFFLINE=1`). Options come from the environment.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    resolve_model_with(spec, &HubOptions::from_env(), ModelFiles::All)
}

/// Downloads (or completes) every file dsv2 needs of a hub repository and returns its
/// snapshot folder. Options come from the environment.
pub fn download(repo_id: &str) -> Result<PathBuf> {
    match parse_model_spec(repo_id)? {
        ModelSource::Hub { repo_id, revision } => fetch(
            &repo_id,
            &revision,
            &HubOptions::from_env(),
            ModelFiles::All,
        ),
        ModelSource::Local(path) => Err(CoreError::ModelSpec {
            spec: path.display().to_string(),
            problem: "is a local folder; download takes a hub id `owner/name`".into(),
        }),
    }
}

/// [`resolve_model`] with explicit options and a choice of files.
pub fn resolve_model_with(spec: &str, opts: &HubOptions, files: ModelFiles) -> Result<PathBuf> {
    match parse_model_spec(spec)? {
        ModelSource::Local(path) => Ok(path),
        ModelSource::Hub { repo_id, revision } => fetch(&repo_id, &revision, opts, files),
    }
}

fn fetch(repo_id: &str, revision: &str, opts: &HubOptions, files: ModelFiles) -> Result<PathBuf> {
    if opts.offline {
        return resolve_offline(repo_id, revision, opts, files);
    }
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(opts.endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(3)
        .build()
        .map_err(|e| CoreError::hub(repo_id, format!("cannot set up the hub client: {e}")))?;
    let repo = api.repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let cache = Cache::new(opts.cache_dir.clone()).repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    // Required files: a 404 is `None`, any other failure an error.
    let get = |file: &str| -> Result<Option<PathBuf>> {
        match repo.get(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(online_error(repo_id, revision, file, opts, &e)),
        }
    };
    // Optional files: also skipped when the server cannot be reached (the cached copy is
    // used as it is, as huggingface_hub does).
    let get_optional = |file: &str| -> Result<Option<PathBuf>> {
        match repo.get(file) {
            Ok(path) => Ok(Some(path)),
            Err(e) if status_of(&e) == Some(404) || is_transport(&e) => Ok(None),
            Err(e) => Err(online_error(repo_id, revision, file, opts, &e)),
        }
    };
    let missing = |file: &str| {
        CoreError::hub(
            repo_id,
            format!("the repository (revision `{revision}`) has no {file}"),
        )
    };
    let config = get("config.json")?.ok_or_else(|| missing("config.json"))?;
    let snapshot = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| CoreError::hub(repo_id, "cache path without a parent"))?;
    get(TOKENIZER_FILES[0])?.ok_or_else(|| missing(TOKENIZER_FILES[0]))?;
    for file in &TOKENIZER_FILES[1..] {
        get_optional(file)?;
    }
    if files == ModelFiles::All {
        // Prefer what the cache has, so a complete cached copy needs no network.
        let index = match cache.get(INDEX_FILE) {
            Some(path) => Some(path),
            None if cache.get(SINGLE_WEIGHTS_FILE).is_some() => None,
            None => get(INDEX_FILE)?,
        };
        match index {
            Some(index) => {
                for shard in shards_of(repo_id, &index)? {
                    get(&shard)?.ok_or_else(|| {
                        CoreError::hub(
                            repo_id,
                            format!("{INDEX_FILE} lists {shard}, which the repository lacks"),
                        )
                    })?;
                }
            }
            None => {
                get(SINGLE_WEIGHTS_FILE)?
                    .ok_or_else(|| missing(&format!("{INDEX_FILE} nor {SINGLE_WEIGHTS_FILE}")))?;
            }
        }
    }
    Ok(snapshot)
}

fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::RequestError(inner) => match inner.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        ApiError::TooManyRetries(inner) => status_of(inner),
        _ => None,
    }
}

fn is_transport(e: &ApiError) -> bool {
    match e {
        ApiError::RequestError(inner) => matches!(inner.as_ref(), ureq::Error::Transport(_)),
        ApiError::TooManyRetries(inner) => is_transport(inner),
        _ => false,
    }
}

fn online_error(
    repo_id: &str,
    revision: &str,
    file: &str,
    opts: &HubOptions,
    e: &ApiError,
) -> CoreError {
    let cache = repo_cache_dir(&opts.cache_dir, repo_id);
    let problem = match status_of(e) {
        Some(401) | Some(403) => format!(
            "access denied fetching {file} (HTTP {}): the repository is gated or private; \
             accept its terms on the hub and set HF_TOKEN",
            status_of(e).unwrap_or(0)
        ),
        Some(code) => format!("fetching {file} (revision `{revision}`) failed with HTTP {code}"),
        None if is_transport(e) => format!(
            "no network and no cached copy: cannot reach {} ({e}), and {file} is not in the \
             cache at {}",
            opts.endpoint,
            cache.display()
        ),
        None => format!("fetching {file} failed: {e}"),
    };
    CoreError::hub(repo_id, problem)
}

fn repo_cache_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// Cache-only resolution: the snapshot the revision points to, with every needed file.
fn resolve_offline(
    repo_id: &str,
    revision: &str,
    opts: &HubOptions,
    files: ModelFiles,
) -> Result<PathBuf> {
    let repo_dir = repo_cache_dir(&opts.cache_dir, repo_id);
    let not_cached = |what: String| {
        CoreError::hub(
            repo_id,
            format!(
                "HF_HUB_OFFLINE=1 and {what}; run `dsv2 download {repo_id}` with network access first"
            ),
        )
    };
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        let ref_path = repo_dir.join("refs").join(revision);
        match std::fs::read_to_string(&ref_path) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                return Err(not_cached(format!(
                    "the model (revision `{revision}`) is not in the cache at {}",
                    repo_dir.display()
                )))
            }
        }
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_cached(format!(
            "the cache has no snapshot {} for revision `{revision}`",
            snapshot.display()
        )));
    }
    let mut missing = Vec::new();
    if !snapshot.join("config.json").is_file() {
        missing.push("config.json".to_string());
    }
    if !snapshot.join(TOKENIZER_FILES[0]).is_file() {
        missing.push(TOKENIZER_FILES[0].to_string());
    }
    if files == ModelFiles::All {
        let index = snapshot.join(INDEX_FILE);
        if index.is_file() {
            for shard in shards_of(repo_id, &index)? {
                if !snapshot.join(&shard).is_file() {
                    missing.push(shard);
                }
            }
        } else if !snapshot.join(SINGLE_WEIGHTS_FILE).is_file() {
            missing.push(format!("{INDEX_FILE} or {SINGLE_WEIGHTS_FILE}"));
        }
    }
    if !missing.is_empty() {
        return Err(not_cached(format!(
            "the cached copy at {} is incomplete (missing: {})",
            snapshot.display(),
            missing.join(", ")
        )));
    }
    Ok(snapshot)
}

/// The shard files an index lists, sorted and deduplicated.
fn shards_of(repo_id: &str, index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|source| CoreError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| CoreError::Json {
            path: index.to_path_buf(),
            source,
        })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| CoreError::hub(repo_id, format!("{INDEX_FILE} has no weight_map object")))?;
    let mut shards: Vec<String> = map
        .values()
        .map(|v| {
            v.as_str()
                .filter(|s| !s.contains("..") && !s.starts_with('/'))
                .map(str::to_string)
                .ok_or_else(|| CoreError::hub(repo_id, format!("{INDEX_FILE}: bad shard name {v}")))
        })
        .collect::<Result<_>>()?;
    shards.sort();
    shards.dedup();
    Ok(shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// Builds `hub/models--owner--name/{refs/main, snapshots/<commit>/...}` with the given
    /// files (blobs are skipped: snapshot files may be plain files).
    fn make_cache(root: &Path, repo_id: &str, files: &[(&str, &str)]) -> PathBuf {
        let repo = repo_cache_dir(&root.join("hub"), repo_id);
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
        let snap = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snap).unwrap();
        for (name, text) in files {
            std::fs::write(snap.join(name), text).unwrap();
        }
        snap
    }

    const INDEX: &str = r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors", "c": "model-00001-of-00002.safetensors"}}"#;

    fn full_repo() -> Vec<(&'static str, &'static str)> {
        vec![
            ("config.json", "{}"),
            ("tokenizer.json", "{}"),
            ("tokenizer_config.json", "{}"),
            (INDEX_FILE, INDEX),
            ("model-00001-of-00002.safetensors", "x"),
            ("model-00002-of-00002.safetensors", "y"),
        ]
    }

    fn opts(root: &Path, offline: bool) -> HubOptions {
        HubOptions {
            cache_dir: root.join("hub"),
            // Port 9 on loopback: refused at once, so "no network" without any traffic out.
            endpoint: "http://127.0.0.1:9".into(),
            token: None,
            offline,
            progress: false,
        }
    }

    #[test]
    fn offline_finds_a_complete_cached_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = make_cache(
            tmp.path(),
            "deepseek-ai/DeepSeek-V2-Lite-Chat",
            &full_repo(),
        );
        let got = resolve_model_with(
            "deepseek-ai/DeepSeek-V2-Lite-Chat",
            &opts(tmp.path(), true),
            ModelFiles::All,
        )
        .unwrap();
        assert_eq!(got, snap);
        // An explicit commit works without refs.
        let got = resolve_model_with(
            &format!("deepseek-ai/DeepSeek-V2-Lite-Chat@{COMMIT}"),
            &opts(tmp.path(), true),
            ModelFiles::All,
        )
        .unwrap();
        assert_eq!(got, snap);
    }

    #[test]
    fn online_uses_the_cache_without_contacting_the_server() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = make_cache(tmp.path(), "owner/model", &full_repo());
        let got =
            resolve_model_with("owner/model", &opts(tmp.path(), false), ModelFiles::All).unwrap();
        assert_eq!(got, snap);
    }

    #[test]
    fn offline_missing_repo_or_files_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model_with("owner/absent", &opts(tmp.path(), true), ModelFiles::All)
            .unwrap_err()
            .to_string();
        assert!(err.contains("HF_HUB_OFFLINE=1"), "{err}");
        assert!(err.contains("not in the cache"), "{err}");
        assert!(err.contains("owner/absent"), "{err}");

        let mut files = full_repo();
        files.retain(|f| f.0 != "model-00002-of-00002.safetensors");
        make_cache(tmp.path(), "owner/partial", &files);
        let err = resolve_model_with("owner/partial", &opts(tmp.path(), true), ModelFiles::All)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("incomplete") && err.contains("model-00002-of-00002"),
            "{err}"
        );
        // Tokenizer files alone are enough for TokenizerOnly.
        resolve_model_with(
            "owner/partial",
            &opts(tmp.path(), true),
            ModelFiles::TokenizerOnly,
        )
        .unwrap();
    }

    #[test]
    fn no_network_and_no_cache_says_exactly_that() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model_with("owner/absent", &opts(tmp.path(), false), ModelFiles::All)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no network and no cached copy"), "{err}");
        assert!(err.contains("config.json is not in the cache"), "{err}");
    }

    #[test]
    fn model_specs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        assert_eq!(
            parse_model_spec(dir).unwrap(),
            ModelSource::Local(tmp.path().into())
        );
        assert_eq!(
            parse_model_spec("deepseek-ai/DeepSeek-V2-Lite-Chat").unwrap(),
            ModelSource::Hub {
                repo_id: "deepseek-ai/DeepSeek-V2-Lite-Chat".into(),
                revision: "main".into()
            }
        );
        assert_eq!(
            parse_model_spec("a/b@v1.0").unwrap(),
            ModelSource::Hub {
                repo_id: "a/b".into(),
                revision: "v1.0".into()
            }
        );
        for bad in [
            "gpt2",
            "/no/such/dir",
            "a/b/c",
            "a//b",
            "a/b--c",
            "a/.b",
            "a/b@",
            "./x/y",
        ] {
            let e = parse_model_spec(bad).unwrap_err().to_string();
            assert!(e.contains(bad.trim_end_matches('@')), "{e}");
        }
        std::fs::write(tmp.path().join("f"), "").unwrap();
        let file = tmp.path().join("f");
        assert!(parse_model_spec(file.to_str().unwrap())
            .unwrap_err()
            .to_string()
            .contains("is a file"));
    }

    #[test]
    fn options_from_variables() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file_token\n").unwrap();
        let home = tmp.path().to_str().unwrap().to_string();
        let o = HubOptions::from_vars(
            |k| match k {
                "HF_HOME" => Some(home.clone()),
                "HF_HUB_OFFLINE" => Some("1".into()),
                _ => None,
            },
            None,
        );
        assert_eq!(o.cache_dir, tmp.path().join("hub"));
        assert_eq!(o.token.as_deref(), Some("hf_file_token"));
        assert!(o.offline);
        assert_eq!(o.endpoint, "https://huggingface.co");

        let o = HubOptions::from_vars(
            |k| match k {
                "HF_TOKEN" => Some("hf_env".into()),
                "HF_HUB_CACHE" => Some("/c".into()),
                "HF_HUB_OFFLINE" => Some("0".into()),
                "HF_ENDPOINT" => Some("http://mirror".into()),
                _ => None,
            },
            Some(PathBuf::from("/home/u")),
        );
        assert_eq!(o.cache_dir, PathBuf::from("/c"));
        assert_eq!(o.token.as_deref(), Some("hf_env"));
        assert!(!o.offline);
        assert_eq!(o.endpoint, "http://mirror");

        let o = HubOptions::from_vars(|_| None, Some(PathBuf::from("/home/u")));
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    }
}
