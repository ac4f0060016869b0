//! Hyper-parameters of `Model3`, either the documented full-size reference or
//! derived from the tensor shapes of a checkpoint (the authors publish no
//! config file next to their weights).

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use super::{ModelError, Result};

/// 3-D Swin Transformer V2 (MRI branch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwinConfig {
    /// Side of the cubic input volume (voxels), e.g. 96.
    pub img_size: usize,
    pub in_chans: usize,
    pub patch_size: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    /// MLP hidden width = `mlp_ratio * dim`.
    pub mlp_ratio: usize,
    /// Hidden width of the continuous position bias MLP (512 in Swin V2).
    pub cpb_hidden: usize,
}

impl SwinConfig {
    pub fn num_layers(&self) -> usize {
        self.depths.len()
    }

    /// Token grid side of layer `i` (24, 12, 6, 3 at the reference size).
    pub fn grid(&self, layer: usize) -> usize {
        (self.img_size / self.patch_size) >> layer
    }

    pub fn dim(&self, layer: usize) -> usize {
        self.embed_dim << layer
    }

    /// Width of the final embedding (`embed_dim * 2^(layers-1)`).
    pub fn num_features(&self) -> usize {
        self.dim(self.num_layers().saturating_sub(1))
    }

    /// Effective (window, shift) of a block: where the grid is not larger than
    /// the window, the window becomes the grid and the shift 0.
    pub fn window_shift(&self, layer: usize, block: usize) -> (usize, usize) {
        let g = self.grid(layer);
        if g <= self.window_size {
            (g, 0)
        } else if block % 2 == 1 {
            (self.window_size, self.window_size / 2)
        } else {
            (self.window_size, 0)
        }
    }
}

/// HoVer-Trans (US and MG branches).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoverConfig {
    /// Side of the square input image, e.g. 256.
    pub img_size: usize,
    pub in_chans: usize,
    pub patch_sizes: Vec<usize>,
    pub dims: Vec<usize>,
    pub depths: Vec<usize>,
    /// Heads of the outer (strip) attention per stage.
    pub num_heads: Vec<usize>,
    /// Heads of the inner (pixel) attention per stage.
    pub num_inner_heads: Vec<usize>,
    pub mlp_ratio: usize,
}

impl HoverConfig {
    pub fn num_stages(&self) -> usize {
        self.dims.len()
    }

    /// Side of the feature map entering stage `i` (img/4 after the stem, then
    /// halved by AvgPool2d(2) before every later stage).
    pub fn side(&self, stage: usize) -> usize {
        (self.img_size / 4) >> stage
    }

    /// Patches per side of stage `i`.
    pub fn patches(&self, stage: usize) -> usize {
        self.side(stage) / self.patch_sizes[stage]
    }

    /// Width of a pixel token, `p * p * dim`.
    pub fn inner_dim(&self, stage: usize) -> usize {
        self.patch_sizes[stage] * self.patch_sizes[stage] * self.dims[stage]
    }

    /// Width of a strip token, `p * side * dim`.
    pub fn outer_dim(&self, stage: usize) -> usize {
        self.patch_sizes[stage] * self.side(stage) * self.dims[stage]
    }

    /// Channels leaving the last stage (input of the mapping head).
    pub fn out_chans(&self) -> usize {
        2 * self.dims[self.num_stages() - 1]
    }

    /// Side of the mapping head output (3x3 conv without padding).
    pub fn head_grid(&self) -> usize {
        self.side(self.num_stages() - 1).saturating_sub(2)
    }

    fn reference(in_chans: usize) -> Self {
        Self {
            img_size: 256,
            in_chans,
            patch_sizes: vec![2, 2, 2, 2],
            dims: vec![4, 8, 16, 32],
            depths: vec![2, 4, 4, 2],
            num_heads: vec![2, 4, 8, 16],
            num_inner_heads: vec![2, 4, 8, 16],
            mlp_ratio: 4,
        }
    }
}

/// The whole `Model3`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapConfig {
    pub mri: SwinConfig,
    pub us: HoverConfig,
    pub mg: HoverConfig,
    /// Width F of every branch embedding and of the fused vector.
    pub fusion_dim: usize,
    /// Number of clinical covariates appended before the head (5).
    pub clinical_dim: usize,
    pub num_classes: usize,
}

impl MapConfig {
    /// The authors' full-size `Model3(device='cpu')`: MRI Swin V2 3-D (img 96,
    /// patch 4, embed 96, depths [2,2,6,2], heads [3,6,12,24], window 3), US
    /// and MG HoVer-Trans (img 256, dims [4,8,16,32], depths [2,4,4,2], heads
    /// [2,4,8,16], in_chans 1 / 4), F = 768, 5 clinical covariates, 2 classes.
    pub fn reference() -> Self {
        Self {
            mri: SwinConfig {
                img_size: 96,
                in_chans: 1,
                patch_size: 4,
                embed_dim: 96,
                depths: vec![2, 2, 6, 2],
                num_heads: vec![3, 6, 12, 24],
                window_size: 3,
                mlp_ratio: 4,
                cpb_hidden: 512,
            },
            us: HoverConfig::reference(1),
            mg: HoverConfig::reference(4),
            fusion_dim: 768,
            clinical_dim: 5,
            num_classes: 2,
        }
    }

    /// Side of the MRI input volume (D = H = W).
    pub fn mri_input_side(&self) -> usize {
        self.mri.img_size
    }

    /// Side of the US input image.
    pub fn us_input_side(&self) -> usize {
        self.us.img_size
    }

    /// Side of the MG input image.
    pub fn mg_input_side(&self) -> usize {
        self.mg.img_size
    }

    /// Parse a JSON configuration (the serde form of this struct).
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ModelError::Config {
            key: "<json>".into(),
            msg: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Derive every hyper-parameter from the shapes of a checkpoint's tensors.
    ///
    /// The HoVer-Trans head counts are the only values no tensor shape
    /// carries; they are taken from the authors' `create_model` defaults
    /// (2, 4, 8, 16, ... doubling per stage, the same for inner and outer).
    pub fn from_shapes(shapes: &HashMap<String, Vec<usize>>) -> Result<Self> {
        let s = Shapes(shapes);
        let mri = derive_swin(&s, "backbone_mri")?;
        let us = derive_hover(&s, "backbone_us")?;
        let mg = derive_hover(&s, "backbone_mm")?;
        let mh = s.get("backbone_us.mapping_head.0.weight", 4)?;
        let fusion_dim = mh[0];
        let head = s.get("head.weight", 2)?;
        if head[1] <= fusion_dim {
            return Err(cfg_err(
                "head.weight",
                format!("width {} is not larger than F = {fusion_dim}", head[1]),
            ));
        }
        let cfg = Self {
            mri,
            us,
            mg,
            fusion_dim,
            clinical_dim: head[1] - fusion_dim,
            num_classes: head[0],
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the cross-branch invariants (equal embedding widths, divisible
    /// grids and heads).
    pub fn validate(&self) -> Result<()> {
        let m = &self.mri;
        let nl = m.num_layers();
        if nl == 0
            || m.num_heads.len() != nl
            || m.patch_size == 0
            || m.window_size == 0
            || !m.img_size.is_multiple_of(m.patch_size << (nl - 1))
        {
            return Err(cfg_err(
                "backbone_mri",
                format!("inconsistent Swin configuration {m:?}"),
            ));
        }
        for i in 0..nl {
            let (w, _) = m.window_shift(i, 0);
            if !m.grid(i).is_multiple_of(w) || !m.dim(i).is_multiple_of(m.num_heads[i]) {
                return Err(cfg_err(
                    &format!("backbone_mri.layers.{i}"),
                    format!(
                        "grid {} not divisible by window {w} or dim {} by heads {}",
                        m.grid(i),
                        m.dim(i),
                        m.num_heads[i]
                    ),
                ));
            }
        }
        if m.num_features() != self.fusion_dim {
            return Err(cfg_err(
                "backbone_mri.norm.weight",
                format!(
                    "MRI embedding width {} differs from F = {}",
                    m.num_features(),
                    self.fusion_dim
                ),
            ));
        }
        for (name, h) in [("backbone_us", &self.us), ("backbone_mm", &self.mg)] {
            let ns = h.num_stages();
            let lens_ok = ns > 0
                && [
                    h.patch_sizes.len(),
                    h.depths.len(),
                    h.num_heads.len(),
                    h.num_inner_heads.len(),
                ]
                .iter()
                .all(|&l| l == ns);
            if !lens_ok || h.img_size % (4 << (ns - 1)) != 0 {
                return Err(cfg_err(
                    name,
                    format!("inconsistent HoVer-Trans configuration {h:?}"),
                ));
            }
            for i in 0..ns {
                let p = h.patch_sizes[i];
                let ok = p > 0
                    && h.side(i) % p == 0
                    && (i + 1 == ns || h.dims[i + 1] == 2 * h.dims[i])
                    && h.inner_dim(i) % h.num_inner_heads[i] == 0
                    && h.outer_dim(i) % h.num_heads[i] == 0;
                if !ok {
                    return Err(cfg_err(
                        &format!("{name}.stage.{i}"),
                        format!("inconsistent stage {i} of {h:?}"),
                    ));
                }
            }
            if h.side(ns - 1) < 3 {
                return Err(cfg_err(
                    &format!("{name}.mapping_head.0.weight"),
                    "last stage smaller than the 3x3 mapping head".into(),
                ));
            }
        }
        if self.num_classes < 2 {
            return Err(cfg_err(
                "head.weight",
                format!("{} classes, need at least 2", self.num_classes),
            ));
        }
        Ok(())
    }
}

fn cfg_err(key: &str, msg: String) -> ModelError {
    ModelError::Config {
        key: key.to_string(),
        msg,
    }
}

struct Shapes<'a>(&'a HashMap<String, Vec<usize>>);

impl Shapes<'_> {
    fn get(&self, key: &str, rank: usize) -> Result<&[usize]> {
        let s = self.0.get(key).ok_or_else(|| ModelError::MissingTensor {
            key: key.to_string(),
        })?;
        if s.len() != rank {
            return Err(cfg_err(key, format!("shape {s:?} is not of rank {rank}")));
        }
        Ok(s)
    }

    /// Distinct integers `i` such that some key starts with `{prefix}.{i}.`.
    fn indices(&self, prefix: &str) -> Result<usize> {
        let pre = format!("{prefix}.");
        let set: BTreeSet<usize> = self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&pre))
            .filter_map(|rest| rest.split('.').next()?.parse().ok())
            .collect();
        // Indices must be 0..n without holes.
        if set.iter().enumerate().any(|(i, &v)| i != v) {
            return Err(cfg_err(prefix, format!("non-contiguous indices {set:?}")));
        }
        Ok(set.len())
    }
}

fn exact_root(n: usize, k: u32, key: &str) -> Result<usize> {
    let r = (n as f64).powf(1.0 / k as f64).round() as usize;
    if r.pow(k) != n {
        return Err(cfg_err(key, format!("{n} is not a {k}-th power")));
    }
    Ok(r)
}

fn derive_swin(s: &Shapes, root: &str) -> Result<SwinConfig> {
    let pe_key = format!("{root}.patch_embed.proj.weight");
    let pe = s.get(&pe_key, 5)?;
    let (embed_dim, in_chans, patch_size) = (pe[0], pe[1], pe[2]);
    if pe[3] != patch_size || pe[4] != patch_size {
        return Err(cfg_err(&pe_key, format!("non-cubic patch {pe:?}")));
    }
    let nl = s.indices(&format!("{root}.layers"))?;
    if nl == 0 {
        return Err(ModelError::MissingTensor {
            key: format!("{root}.layers.0"),
        });
    }
    let mut depths = Vec::with_capacity(nl);
    let mut num_heads = Vec::with_capacity(nl);
    for i in 0..nl {
        let d = s.indices(&format!("{root}.layers.{i}.blocks"))?;
        if d == 0 {
            return Err(ModelError::MissingTensor {
                key: format!("{root}.layers.{i}.blocks.0"),
            });
        }
        depths.push(d);
        let key = format!("{root}.layers.{i}.blocks.0.attn.logit_scale");
        num_heads.push(s.get(&key, 3)?[0]);
    }
    let cpb_key = format!("{root}.layers.0.blocks.0.attn.cpb_mlp.0.weight");
    let cpb_hidden = s.get(&cpb_key, 2)?[0];
    let fc1_key = format!("{root}.layers.0.blocks.0.mlp.fc1.weight");
    let fc1 = s.get(&fc1_key, 2)?;
    if fc1[1] != embed_dim || fc1[0] % embed_dim != 0 {
        return Err(cfg_err(
            &fc1_key,
            format!("shape {fc1:?} vs embed {embed_dim}"),
        ));
    }
    let mlp_ratio = fc1[0] / embed_dim;
    // The window is the cube root of the tokens per window; the coordinate
    // table (2w-1)^3 gives the configured window even where a small last
    // grid shrank the effective one.
    let table_key = format!("{root}.layers.0.blocks.0.attn.relative_coords_table");
    let table = s.get(&table_key, 5)?;
    let window_size = table[1].div_ceil(2);
    if table[1] != 2 * window_size - 1 || table[2] != table[1] || table[3] != table[1] {
        return Err(cfg_err(&table_key, format!("unexpected shape {table:?}")));
    }
    // Input size: a shifted block's attn_mask holds (grid / window)^3 windows.
    let mut img_size = None;
    'outer: for (i, &d) in depths.iter().enumerate() {
        for j in 0..d {
            let key = format!("{root}.layers.{i}.blocks.{j}.attn_mask");
            if s.0.contains_key(&key) {
                let m = s.get(&key, 3)?;
                let per_axis = exact_root(m[0], 3, &key)?;
                let grid0 = (per_axis * window_size) << i;
                img_size = Some(grid0 * patch_size);
                break 'outer;
            }
        }
    }
    let img_size = match img_size {
        Some(v) => v,
        None => {
            // No shifted block anywhere: every grid fits in one window, and the
            // first layer's index (w_eff^3 tokens) gives its grid.
            let key = format!("{root}.layers.0.blocks.0.attn.relative_position_index");
            let n = s.get(&key, 2)?[0];
            exact_root(n, 3, &key)? * patch_size
        }
    };
    Ok(SwinConfig {
        img_size,
        in_chans,
        patch_size,
        embed_dim,
        depths,
        num_heads,
        window_size,
        mlp_ratio,
        cpb_hidden,
    })
}

fn derive_hover(s: &Shapes, root: &str) -> Result<HoverConfig> {
    let stem_key = format!("{root}.downsample.0.0.weight");
    let in_chans = s.get(&stem_key, 4)?[1];
    let ns = s.indices(&format!("{root}.stage"))?;
    if ns == 0 {
        return Err(ModelError::MissingTensor {
            key: format!("{root}.stage.0"),
        });
    }
    let mut dims = Vec::with_capacity(ns);
    let mut depths = Vec::with_capacity(ns);
    let mut patch_sizes = Vec::with_capacity(ns);
    let mut mlp_ratio = 4;
    for i in 0..ns {
        let key = format!("{root}.stage.{i}.merge.conv.0.weight");
        let d = s.get(&key, 4)?[1] / 2;
        if d == 0 {
            return Err(cfg_err(&key, "zero channels".into()));
        }
        let depth = s.indices(&format!("{root}.stage.{i}.blocks"))?;
        if depth == 0 {
            return Err(ModelError::MissingTensor {
                key: format!("{root}.stage.{i}.blocks.0"),
            });
        }
        let key = format!("{root}.stage.{i}.blocks.0.norm_in.weight");
        let inner = s.get(&key, 1)?[0];
        let p = exact_root(inner / d, 2, &key)?;
        if p * p * d != inner {
            return Err(cfg_err(&key, format!("width {inner} is not p*p*{d}")));
        }
        let key = format!("{root}.stage.{i}.blocks.0.mlp_in1.fc1.weight");
        let fc1 = s.get(&key, 2)?;
        if fc1[1] != inner || fc1[0] % inner != 0 {
            return Err(cfg_err(
                &key,
                format!("shape {fc1:?} vs inner width {inner}"),
            ));
        }
        mlp_ratio = fc1[0] / inner;
        dims.push(d);
        depths.push(depth);
        patch_sizes.push(p);
    }
    let key = format!("{root}.row_pos");
    let row_pos = s.get(&key, 3)?;
    let img_size = 4 * row_pos[1] * patch_sizes[0];
    let heads: Vec<usize> = (0..ns).map(|i| 2usize << i).collect();
    Ok(HoverConfig {
        img_size,
        in_chans,
        patch_sizes,
        dims,
        depths,
        num_heads: heads.clone(),
        num_inner_heads: heads,
        mlp_ratio,
    })
}
