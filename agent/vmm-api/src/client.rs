//! A client for a fabric-vmm's control socket (the `fabric.v1.Vmm` service over a Unix socket).

use std::path::{Path, PathBuf};

use fabric_proto::v1::vmm_client::VmmClient;
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Connects to the control socket at `path`.
pub async fn connect(path: &Path) -> Result<VmmClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = path.to_owned();
    // The URI is required by the API but unused: the connector below dials the socket.
    let channel = Endpoint::from_static("http://fabric-vmm.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(VmmClient::new(channel))
}
