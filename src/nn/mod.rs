//! The networks: V-Net and U-Net built from the layers in [`layers`], their tensors declared in one
//! fixed order and kept in [`ParamStore`]s. A network is a description (indices into the stores);
//! its forward pass takes the stores' values, so the same network runs with a student's, a
//! teacher's or a look-ahead step's parameters, on any backend.

pub mod layers;
pub mod params;
pub mod recalibrate;
pub mod unet;
pub mod vnet;

pub use layers::{Forward, Mode};
pub use params::{Declarations, Init, ParamSpec, ParamStore};
pub use unet::{UNet, UNetConfig};
pub use vnet::{VNet, VNetConfig};

use metaseg_autograd::{
    Backend, BatchStats, ContrastiveBackend, ConvBackend, DistanceBackend, LayerBackend,
    LossBackend, MetaBackend, Result, Var, WarpBackend,
};

/// What a network needs of a backend, and what the training methods add: the warps of
/// augmentation and of MLB-Seg's views, MLB-Seg's weight normalisation, DTML's signed distance
/// maps.
pub trait NetBackend:
    Backend
    + ConvBackend
    + LayerBackend
    + LossBackend
    + WarpBackend
    + MetaBackend
    + DistanceBackend
    + ContrastiveBackend
{
}
impl<
        B: Backend
            + ConvBackend
            + LayerBackend
            + LossBackend
            + WarpBackend
            + MetaBackend
            + DistanceBackend
            + ContrastiveBackend,
    > NetBackend for B
{
}

/// The batch statistics a training forward measured: (index of the running mean in the stats
/// store, the statistics), for [`layers::updated_stats`].
pub type PassStats<B> = Vec<(usize, BatchStats<B>)>;

/// The outputs of one forward pass.
pub struct Outputs<B: NetBackend> {
    /// Segmentation logits [N, classes, D, H, W].
    pub logits: Var<B>,
    /// The second decoder's logits, if the network has one (IDEAL).
    pub logits_b: Option<Var<B>>,
    /// The tanh signed-distance head, if the network has one.
    pub sdf: Option<Var<B>>,
    /// The projection head's embeddings (not normalised), if the network has one.
    pub embedding: Option<Var<B>>,
    /// Batch statistics of a training forward, for [`layers::updated_stats`].
    pub batch_stats: Vec<(usize, BatchStats<B>)>,
}

/// A segmentation network: its declared tensors and its forward pass.
pub trait Network {
    /// The trained parameters, in store order.
    fn params(&self) -> &Declarations;
    /// The carried running statistics, in store order.
    fn stats(&self) -> &Declarations;
    /// The forward pass over `x` [N, in_channels, D, H, W].
    fn forward<B: NetBackend>(&self, f: &Forward<B>, x: &Var<B>) -> Result<Outputs<B>>;

    /// The parameters at their initial values (Kaiming-normal convolutions from `seed`).
    fn init_params<B: Backend>(&self, backend: &B, seed: u64) -> Result<ParamStore<B>> {
        ParamStore::init(backend, self.params(), seed)
    }

    /// The running statistics at their initial values (mean 0, variance 1).
    fn init_stats<B: Backend>(&self, backend: &B) -> Result<ParamStore<B>> {
        ParamStore::init(backend, self.stats(), 0)
    }

    /// The forward pass with these stores in `mode`.
    fn run<B: NetBackend>(
        &self,
        params: &ParamStore<B>,
        stats: &ParamStore<B>,
        x: &Var<B>,
        mode: Mode,
    ) -> Result<Outputs<B>> {
        self.forward(&Forward::new(params.values(), stats.values(), mode), x)
    }
}

/// Checks that every spatial axis of `x` [N, C, D, H, W] divides by `factor` (per axis) and that
/// it has `channels` channels; the error names the network and the patch.
pub(crate) fn check_input(
    net: &'static str,
    x: &metaseg_autograd::Shape,
    channels: usize,
    factor: [usize; 3],
) -> Result<()> {
    let bad = |message: String| metaseg_autograd::Error::InvalidArgument { op: net, message };
    let [_, c, d, h, w] = <[usize; 5]>::try_from(x.dims())
        .map_err(|_| bad(format!("expected input [N, C, D, H, W], got {x}")))?;
    if c != channels {
        return Err(bad(format!("expected {channels} input channels, got {x}")));
    }
    if [d, h, w]
        .iter()
        .zip(factor)
        .any(|(s, f)| s % f != 0 || *s == 0)
    {
        return Err(bad(format!(
            "patch {d}x{h}x{w} must divide by {}x{}x{} (the down-sampling of its stages)",
            factor[0], factor[1], factor[2]
        )));
    }
    Ok(())
}
