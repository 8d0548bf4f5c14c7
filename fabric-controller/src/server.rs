//! The controller's gRPC services and who may call them, assembled once: for the binary, and
//! for tests that drive the whole request path in process (tests/rpc_fuzz.rs).

use std::sync::Arc;

use fabric_proto::tls::{AuthorizeLayer, Identity};
use fabric_proto::v1::compute_server::ComputeServer;
use fabric_proto::v1::host_link_server::HostLinkServer;
use fabric_proto::v1::images_server::ImagesServer;
use tonic::service::Routes;

use crate::compute::ComputeService;
use crate::controller::Controller;
use crate::hostlink::HostLinkService;
use crate::images::{ImageStore, ImagesService};

/// The largest message the Images service decodes (a chunk of a push, and its framing).
pub const MAX_IMAGES_MESSAGE: usize = 4 << 20;

/// The refusal of every call its caller may not make ([`Controller::authorize`]), before
/// any service decodes it.
pub fn authorize_layer(controller: &Arc<Controller>) -> AuthorizeLayer {
    let checker = controller.clone();
    let controller = controller.clone();
    AuthorizeLayer::new(Arc::new(move |path: &str, caller: &Identity| {
        controller.authorize(path, caller)
    }))
    .with_certificate_check(Arc::new(move |peer| checker.certificate_check(peer)))
}

/// Compute, HostLink and Images, over `controller` and `images`.
pub fn fabric_routes(controller: &Arc<Controller>, images: &Arc<ImageStore>) -> Routes {
    Routes::new(ComputeServer::new(ComputeService::new(
        controller.clone(),
        images.clone(),
    )))
    .add_service(HostLinkServer::new(HostLinkService::new(
        controller.clone(),
    )))
    .add_service(
        ImagesServer::new(ImagesService {
            images: images.clone(),
            controller: controller.clone(),
        })
        .max_decoding_message_size(MAX_IMAGES_MESSAGE),
    )
}
