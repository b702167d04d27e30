//! The API's request bodies through the real router (`sovereign_api::router`)
//! with the demo model loaded (`SOVEREIGN_FUZZ_MODEL`, the path
//! `scripts/fetch-model` prints): the first byte picks the endpoint (chat,
//! completions, embeddings), the rest is the body. Validation, tool and
//! response-format planning, chat-template rendering, tokenization and (for
//! bodies that pass) a generation capped at two tokens all run. Must never
//! panic, and a bad body is the client's error: never a 500.
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use libfuzzer_sys::fuzz_target;
use sovereign_api::{router, AppState, ClientAddr, Limits, LocalBackend};
use tower::ServiceExt;

struct Harness {
    runtime: tokio::runtime::Runtime,
    state: Arc<AppState>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let model = std::env::var_os("SOVEREIGN_FUZZ_MODEL")
            .expect("SOVEREIGN_FUZZ_MODEL: the demo model's path (scripts/fetch-model)");
        let engine = sovereign_inference::Engine::load(std::path::Path::new(&model))
            .expect("the demo model loads");
        let limits = Limits {
            max_tokens: Some(2),
            ..Limits::default()
        };
        Harness {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime"),
            state: AppState::new(
                "smollm2".into(),
                LocalBackend::new(Arc::new(engine), &limits),
                None,
                limits,
                None,
            ),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let path = match which % 3 {
        0 => "/v1/chat/completions",
        1 => "/v1/completions",
        _ => "/v1/embeddings",
    };
    let harness = harness();
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("content-type", "application/json")
        // What the server's connection task attaches to every request.
        .extension(ConnectInfo(ClientAddr(([127, 0, 0, 1], 40000).into())))
        .body(Body::from(body.to_vec()))
        .expect("request");
    let (status, text) = harness.runtime.block_on(async {
        let response = router(Arc::clone(&harness.state))
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 26)
            .await
            .unwrap_or_default();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    });
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: {text}");
});
