//! Addresses of the controller and of the agent's own service: TCP (`https://HOST:PORT`,
//! `HOST:PORT`; always mutual TLS) or a Unix socket (`unix:/PATH`).

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// A parsed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// `https://host:port` (the form tonic connects to).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl Address {
    pub fn parse(text: &str) -> Result<Address, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err(format!("{text:?}: a unix socket path must be absolute"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let rest = if let Some(rest) = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))
        {
            rest
        } else if text.contains("://") {
            return Err(format!(
                "{text:?}: use https://HOST:PORT, HOST:PORT or unix:/PATH"
            ));
        } else {
            text
        };
        let rest = rest.trim_end_matches('/');
        match rest.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Address::Tcp(format!("https://{rest}")))
            }
            _ => Err(format!("{text:?}: expected HOST:PORT")),
        }
    }

    /// `host:port` for binding a TCP listener.
    pub fn socket_addr(&self) -> Option<&str> {
        match self {
            Address::Tcp(uri) => uri.strip_prefix("https://"),
            Address::Unix(_) => None,
        }
    }
}

/// A channel that connects lazily (and reconnects) to `address`; calls fail fast while the
/// peer is unreachable. A TCP address is reached with mutual TLS, presenting `tls`'s
/// certificate (the configuration checked that a TCP address comes with one).
pub fn lazy_channel(
    address: &Address,
    tls: Option<&fabric_proto::tls::TlsFiles>,
) -> Result<Channel, String> {
    let base = |uri: &str| {
        Endpoint::from_shared(uri.to_string())
            .expect("checked by Address::parse")
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    };
    Ok(match address {
        Address::Tcp(uri) => {
            let tls = tls.ok_or("a TCP controller needs the host's certificate (tls_dir)")?;
            base(uri)
                .tls_config(tls.client_config()?)
                .map_err(|e| format!("TLS: {e}"))?
                .connect_lazy()
        }
        Address::Unix(path) => {
            let path = path.clone();
            base("http://controller.invalid").connect_with_connector_lazy(tower::service_fn(
                move |_| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                },
            ))
        }
    })
}

/// The channel to the controller, replaced by a new one when the host's certificate is
/// renewed: tonic reads a channel's TLS configuration once, so a channel built before the
/// renewal would present the old certificate whenever it reconnects. Users take
/// [`current`](Self::current) for each call (the image cache) or watch for the change (the
/// HostLink loop, which moves its calls and its assignment stream to the new channel).
#[derive(Clone)]
pub struct ControllerChannel {
    rx: tokio::sync::watch::Receiver<Channel>,
}

impl ControllerChannel {
    /// A holder of `channel` and the sender that replaces it.
    pub fn new(channel: Channel) -> (tokio::sync::watch::Sender<Channel>, ControllerChannel) {
        let (tx, rx) = tokio::sync::watch::channel(channel);
        (tx, ControllerChannel { rx })
    }

    /// The channel to use now.
    pub fn current(&self) -> Channel {
        self.rx.borrow().clone()
    }

    /// A receiver that sees each replacement.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Channel> {
        self.rx.clone()
    }
}

/// A channel to a TCP controller for a caller without a certificate yet (an agent joining):
/// TLS with the cluster CA (`tls.ca`) as the only root, no client certificate.
pub fn anonymous_channel(
    address: &Address,
    tls: &fabric_proto::tls::TlsFiles,
) -> Result<Channel, String> {
    let Address::Tcp(uri) = address else {
        return Err(
            "joining with a token needs a TCP controller address (https://HOST:PORT)".into(),
        );
    };
    Ok(Endpoint::from_shared(uri.to_string())
        .expect("checked by Address::parse")
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15))
        .tcp_nodelay(true)
        .tls_config(tls.anonymous_client_config()?)
        .map_err(|e| format!("TLS: {e}"))?
        .connect_lazy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("http://10.0.0.1:7070").unwrap(),
            Address::Tcp("https://10.0.0.1:7070".into())
        );
        assert_eq!(
            Address::parse("https://10.0.0.1:7070").unwrap(),
            Address::Tcp("https://10.0.0.1:7070".into())
        );
        assert_eq!(
            Address::parse("localhost:1").unwrap(),
            Address::Tcp("https://localhost:1".into())
        );
        assert_eq!(
            Address::parse("unix:/run/x.sock").unwrap(),
            Address::Unix("/run/x.sock".into())
        );
        assert_eq!(
            Address::parse("unix:///run/x.sock").unwrap(),
            Address::Unix("/run/x.sock".into())
        );
        for bad in ["unix:rel", "ftp://x:1", "x", "x:notaport", ":80", ""] {
            assert!(Address::parse(bad).is_err(), "{bad}");
        }
    }
}
