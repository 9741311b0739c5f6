//! What the end-to-end benchmarks (`load`, `peers`) share: finding and installing the tools
//! they drive, a TLS client trusting the bench certificate, a process's resident memory, and
//! the latency figures load generators print. Included with `mod common;` (a directory, so
//! cargo does not take it for a benchmark of its own).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

/// The gateway binary to run: `PORTCULLIS_BIN` if set (a build of another commit, for an A/B
/// in one run), else the one cargo built for this benchmark.
pub fn gateway_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_portcullis")))
}

/// `name` on `PATH`, or in the sbin directories Debian puts servers in.
pub fn find_bin(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `bin`, installing the first of `pkgs` that provides it (Debian packages) when it is missing.
pub fn ensure(bin: &str, pkgs: &[&str]) -> Option<PathBuf> {
    if let Some(p) = find_bin(bin) {
        return Some(p);
    }
    for update in [false, true] {
        if update {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        }
        for pkg in pkgs {
            eprintln!("installing {pkg} (Debian package)...");
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                // Keeps invoke-rc.d from starting the package's own service.
                .env("RUNLEVEL", "1")
                .status();
            if let Some(p) = find_bin(bin) {
                return Some(p);
            }
        }
    }
    None
}

/// A TLS client (ring, safe defaults, ALPN `http/1.1`) trusting the PEM certificate `cert_pem`.
pub fn tls_client(cert_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap())
        .unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

/// VmRSS of process `pid` in KiB (0 when it is gone).
pub fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A latency as wrk and h2load print it (`812.00us`, `1.65ms`, `2.1s`), in milliseconds.
pub fn latency_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (v, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1e3)
    } else {
        return None;
    };
    v.parse::<f64>().ok().map(|n| n * scale)
}

/// A child of the bench: killed (SIGKILL, by its own PID) and reaped when dropped, so a failing
/// bench leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
