//! The benchmark's baseline (scripts/bench.sh): a bare axum server that answers every GET with a fixed
//! body and the same headers as tokend's token answer — what tokend would cost if serving a cached
//! token were free. Usage: `baseline ADDR BODY_FILE`.

use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(addr), Some(body_file)) = (args.next(), args.next()) else {
        eprintln!("usage: baseline ADDR BODY_FILE");
        std::process::exit(64);
    };
    let body: &'static [u8] = Box::leak(std::fs::read(&body_file)?.into_boxed_slice());
    let answer = move || async move {
        let mut resp = body.into_response();
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    };
    let app = axum::Router::new().fallback(answer);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
