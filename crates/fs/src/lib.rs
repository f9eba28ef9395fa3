//! DeltaFS: the filesystem side of a sandbox.
//!
//! A sandbox's root is an overlayfs: read-only base layers (an [`image::BaseImage`]) under one writable layer in
//! the sandbox's state directory. This crate builds the base layers (the masked host root, a plain directory,
//! or an unpacked OCI image) and mounts overlays with the new mount API, which has no 4 KiB option-string cap on
//! the number of lower layers (later steps stack hundreds of checkpoint layers).

pub mod compact;
pub mod error;
pub mod host_base;
pub mod image;
pub mod oci;
pub mod overlay;
pub mod whiteout;

pub use error::{Error, Result};

/// Top-level directory (present in every base layer, so never created in a writable layer) where a sandbox's
/// next filesystem generation is mounted before `pivot_root`. A read-only tmpfs covers it in a running sandbox
/// so that nothing inside can remove or fill it.
pub const GENERATION_MOUNTPOINT: &str = ".deltabox";
pub use image::{BaseImage, ImageConfig, ImageStore};
pub use overlay::LayerStack;
