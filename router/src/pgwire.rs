//! Just enough of the Postgres wire protocol to turn a client away properly.
//!
//! The router forwards bytes and never parses traffic — except when it cannot serve a
//! connection (no primary within the hold time, backend unreachable). Then it reads
//! the client's startup packet (declining SSL/GSS encryption requests first) and
//! answers with a FATAL ErrorResponse, so psql or a driver shows a real error instead
//! of a silent hang or a reset.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
/// SQLSTATE 57P03, cannot_connect_now: what Postgres itself says while starting up.
const CANNOT_CONNECT_NOW: &str = "57P03";

/// Reads the startup packet and answers with a FATAL error carrying `message`.
pub async fn reject(client: &mut TcpStream, message: &str) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        // At most two negotiation requests precede the real startup packet.
        for _ in 0..3 {
            let len = client.read_u32().await? as usize;
            if !(8..=10_000).contains(&len) {
                break;
            }
            let mut rest = vec![0u8; len - 4];
            client.read_exact(&mut rest).await?;
            let code = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            if code == SSL_REQUEST || code == GSSENC_REQUEST {
                client.write_all(b"N").await?;
                continue;
            }
            break;
        }
        client.write_all(&error_response(message)).await?;
        client.flush().await?;
        Ok::<(), std::io::Error>(())
    })
    .await;
}

fn error_response(message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (kind, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', CANNOT_CONNECT_NOW),
        (b'M', message),
    ] {
        fields.push(kind);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_response_layout() {
        let e = super::error_response("x");
        assert_eq!(e[0], b'E');
        assert_eq!(u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize, e.len() - 1);
        assert!(e.ends_with(b"Mx\0\0"));
    }
}
