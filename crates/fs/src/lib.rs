//! DeltaFS: the filesystem side of a sandbox.
//!
//! A sandbox's root is an overlayfs: read-only base layers (an [`image::BaseImage`]) under one writable layer in
//! the sandbox's state directory. This crate builds the base layers (the masked host root, a plain directory,
//! or an unpacked OCI image) and mounts overlays with the new mount API, which has no 4 KiB option-string cap on
//! the number of lower layers (later steps stack hundreds of checkpoint layers).

pub mod error;
pub mod host_base;
pub mod image;
pub mod oci;
pub mod overlay;
pub mod whiteout;

pub use error::{Error, Result};
pub use image::{BaseImage, ImageConfig, ImageStore};
pub use overlay::LayerStack;
