//! Base images: where a sandbox's read-only layers come from.

use std::path::{Path, PathBuf};

use crate::{host_base, oci, Error, Result};

/// Runtime defaults an image carries (from an OCI config; empty for the host and directory images).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` environment.
    pub env: Vec<String>,
    /// Default working directory.
    pub working_dir: Option<String>,
    /// Default command (informational).
    pub cmd: Vec<String>,
}

/// A resolved base image: the read-only layers a sandbox's writable layer sits on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BaseImage {
    /// What the user asked for (`host`, a directory, an archive path).
    pub reference: String,
    /// Identity: `host`, `dir:<path>`, or the OCI manifest digest.
    pub digest: String,
    /// Read-only layers, topmost first.
    pub layers: Vec<PathBuf>,
    /// Runtime defaults.
    pub config: ImageConfig,
}

/// Owns the unpacked images and shared layers under one directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    host_root: PathBuf,
    hidden: Vec<PathBuf>,
}

/// Directories every sandbox root needs as mountpoints; provided by a tiny shared layer so they never have to be
/// created in (and so written into) a sandbox's writable layer.
const SKELETON: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    ("tmp", 0o1777),
    ("etc", 0o755),
    ("root", 0o700),
    (crate::GENERATION_MOUNTPOINT, 0o000),
];

impl ImageStore {
    /// `root`: where images and shared layers live. `host_root`: a non-recursive bind mount of the host's `/`
    /// (the lowest layer of the default image). `hidden`: host paths to keep invisible even inside visible
    /// system directories (the daemon's state).
    pub fn new(
        root: impl Into<PathBuf>,
        host_root: impl Into<PathBuf>,
        hidden: Vec<PathBuf>,
    ) -> Self {
        ImageStore {
            root: root.into(),
            host_root: host_root.into(),
            hidden,
        }
    }

    /// Resolves an image reference: `None`/`"host"`, a directory, an OCI layout directory, or an archive file.
    pub fn resolve(&self, reference: Option<&str>) -> Result<BaseImage> {
        let layers_dir = self.root.join("layers");
        match reference {
            None | Some("host") => {
                let mask = host_base::build_mask_layer(Path::new("/"), &layers_dir, &self.hidden)?;
                Ok(BaseImage {
                    reference: "host".into(),
                    digest: "host".into(),
                    layers: vec![mask, self.host_root.clone()],
                    config: ImageConfig::default(),
                })
            }
            Some(r) => {
                let path = std::fs::canonicalize(r).map_err(|e| Error::BadImage {
                    path: r.into(),
                    reason: e.to_string(),
                })?;
                let skel = self.skeleton(&layers_dir)?;
                if path.is_dir()
                    && !path.join("oci-layout").exists()
                    && !path.join("index.json").exists()
                {
                    if path == Path::new("/") {
                        return Err(Error::BadImage {
                            path,
                            reason: "use the default image for the host root".into(),
                        });
                    }
                    return Ok(BaseImage {
                        reference: r.into(),
                        digest: format!("dir:{}", path.display()),
                        layers: vec![skel, path],
                        config: ImageConfig::default(),
                    });
                }
                let (digest, rootfs, config) = oci::unpack(&path, &self.root.join("oci"))?;
                Ok(BaseImage {
                    reference: r.into(),
                    digest,
                    layers: vec![skel, rootfs],
                    config,
                })
            }
        }
    }

    fn skeleton(&self, layers_dir: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = layers_dir.join("skeleton-v2");
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = layers_dir.join(format!(".skeleton-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        for (name, mode) in SKELETON {
            let p = tmp.join(name);
            std::fs::create_dir_all(&p).map_err(Error::io("create", &p))?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))
                .map_err(Error::io("chmod", &p))?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(Error::io("chmod", &tmp))?;
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Ok(dir)
    }
}
