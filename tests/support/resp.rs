//! One Redis command over RESP on a new connection, for the tests' and the benches' own
//! redis-server (the benches include this file by path): enough to read what the gateways
//! wrote, without a Redis client in the test's own code path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends `args` (after `AUTH password`, if given) and returns the raw answer (`None`: no
/// connection). Redis answers, then closes a connection whose client has shut its side.
pub fn command(addr: SocketAddr, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = String::new();
    let auth = password.map(|p| ["AUTH", p]);
    for cmd in auth.as_ref().map(|a| &a[..]).into_iter().chain([args]) {
        req.push_str(&format!("*{}\r\n", cmd.len()));
        for a in cmd {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
    }
    s.write_all(req.as_bytes()).ok()?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}
