//! A demo backend: `cargo run --example backend -- --port 5001`.
//!
//! `GET /` answers one line naming its port; `GET /health` answers `ok`. Anything else is
//! echoed back as a line with the method and path, so the balancer can be tried with curl.

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
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

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let port = args.port;
    println!("backend listening on http://127.0.0.1:{port}");
    HttpServer::new(move || {
        App::new()
            .route(
                "/",
                web::get().to(move || async move {
                    HttpResponse::Ok().body(format!("Hello from backend on port {port}\n"))
                }),
            )
            .route(
                "/health",
                web::get().to(|| async { HttpResponse::Ok().body("ok\n") }),
            )
            .default_service(web::to(move |req: HttpRequest| async move {
                HttpResponse::Ok().body(format!("backend {port}: {} {}\n", req.method(), req.uri()))
            }))
    })
    .workers(args.workers)
    .bind(("127.0.0.1", port))?
    .run()
    .await
}
