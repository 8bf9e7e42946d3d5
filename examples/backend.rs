//! A demo backend: `cargo run --example backend -- --port 5001`.
//!
//! `GET /` answers one line naming its port; `POST /` and any request to `/echo` answer
//! the request body; `OPTIONS /` lists the methods of `/`, which answers others with 405;
//! `GET /health` answers `ok`; `GET /bytes/N` streams N bytes (a download of any size,
//! for `bench/soak`). Anything else is echoed back as a line with the method and
//! path, so the balancer can be tried with curl. Every answer with a body says its type.

use actix_web::{
    http::header::{self, ContentType},
    web, App, HttpRequest, HttpResponse, HttpServer,
};
use clap::Parser;

#[derive(Parser)]
#[command(about = "A demo backend for roundabout")]
struct Args {
    /// The port to listen on (127.0.0.1).
    #[arg(long, default_value_t = 5001)]
    port: u16,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

/// The methods `/` answers, for `Allow` (RFC 9110 §10.2.1).
const ROOT_ALLOW: &str = "GET, HEAD, POST, OPTIONS";

/// The request body back, streamed (any size), with the request's Content-Type
/// (octet-stream when none).
async fn echo(req: HttpRequest, body: web::Payload) -> HttpResponse {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| header::HeaderValue::from_static("application/octet-stream"));
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .streaming(body)
}

/// `n` bytes, streamed in 64 KiB chunks (never held whole).
async fn bytes(n: web::Path<u64>) -> HttpResponse {
    let total = n.into_inner();
    let chunk = web::Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(0u64, move |sent| {
        let chunk = chunk.clone();
        async move {
            let n = (total - sent).min(chunk.len() as u64);
            (n > 0).then(|| {
                (
                    Ok::<_, actix_web::Error>(chunk.slice(..n as usize)),
                    sent + n,
                )
            })
        }
    });
    HttpResponse::Ok()
        .content_type(ContentType::octet_stream())
        .no_chunking(total)
        .streaming(stream)
}

#[actix_web::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let port = args.port;
    let server = HttpServer::new(move || {
        let hello = move || async move {
            HttpResponse::Ok()
                .content_type(ContentType::plaintext())
                .body(format!("Hello from backend on port {port}\n"))
        };
        App::new()
            .service(
                web::resource("/")
                    .route(web::get().to(hello))
                    .route(web::head().to(hello))
                    .route(web::post().to(echo))
                    .route(web::method(actix_web::http::Method::OPTIONS).to(|| async {
                        HttpResponse::NoContent()
                            .insert_header((header::ALLOW, ROOT_ALLOW))
                            .finish()
                    }))
                    .default_service(web::to(|| async {
                        HttpResponse::MethodNotAllowed()
                            .insert_header((header::ALLOW, ROOT_ALLOW))
                            .content_type(ContentType::plaintext())
                            .body("method not allowed\n")
                    })),
            )
            .route("/echo", web::to(echo))
            .route("/bytes/{n}", web::get().to(bytes))
            .route(
                "/health",
                web::get().to(|| async {
                    HttpResponse::Ok()
                        .content_type(ContentType::plaintext())
                        .body("ok\n")
                }),
            )
            .default_service(web::to(move |req: HttpRequest| async move {
                HttpResponse::Ok()
                    .content_type(ContentType::plaintext())
                    .body(format!("backend {port}: {} {}\n", req.method(), req.uri()))
            }))
    })
    .workers(args.workers)
    .bind(("127.0.0.1", port));
    // "listening" only once it is true: scripts wait for this line.
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            eprintln!(
                "backend: cannot listen on 127.0.0.1:{port}: {e} (another program has it? pick another with --port)"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("backend listening on http://127.0.0.1:{port}");
    match server.run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backend: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
