//! The systemd units in `dist/` pass `systemd-analyze verify` (installed by scripts/test):
//! every directive known, the socket and service consistent, and the command runnable. The
//! units name the installed path of the binary and its config; verify wants that binary to
//! exist, so a copy of the service unit names the built one instead, and the repo's config.

use std::{path::Path, process::Command};

const INSTALLED: &str = "/usr/local/bin/roundabout --config /etc/roundabout/roundabout.toml";

/// Runs `systemd-analyze verify` on the units in `dir`: whether it passed, and what it said.
fn verify(dir: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.join("roundabout.socket"))
        .arg(dir.join("roundabout.service"))
        .output()
        .expect("systemd-analyze runs (scripts/test installs the systemd package)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The units of `dist/` in a directory of their own, the service's command pointing at
/// `command`, and `edit` applied to the service.
fn units(command: &str, edit: impl Fn(String) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string("dist/roundabout.service").unwrap();
    assert!(
        service.contains(&format!("ExecStart={INSTALLED}\n")),
        "{service}"
    );
    std::fs::write(
        dir.path().join("roundabout.service"),
        edit(service.replace(INSTALLED, command)),
    )
    .unwrap();
    std::fs::copy(
        "dist/roundabout.socket",
        dir.path().join("roundabout.socket"),
    )
    .unwrap();
    dir
}

fn built() -> String {
    let config = std::fs::canonicalize("config/default.toml").unwrap();
    format!(
        "{} --config {}",
        env!("CARGO_BIN_EXE_roundabout"),
        config.display()
    )
}

#[test]
fn the_units_in_dist_pass_systemd_analyze_verify_without_a_word() {
    let dir = units(&built(), |s| s);
    let (ok, said) = verify(dir.path());
    assert!(ok, "{said}");
    assert_eq!(said, "", "warnings");
}

#[test]
fn verify_catches_an_unknown_directive_and_a_missing_binary() {
    // What the test above relies on: verify speaks up about both.
    let dir = units(&built(), |s| s.replace("Restart=", "Restrat="));
    let (_, said) = verify(dir.path());
    assert!(said.contains("Restrat"), "{said}");
    let dir = units("/nonexistent/roundabout --config x", |s| s);
    let (ok, said) = verify(dir.path());
    assert!(!ok && said.contains("/nonexistent/roundabout"), "{said}");
}
