//! `gradleak client`: the gradient a client computes, in the model's dtype.

use super::values;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use faer::Mat;

use gradleak::Dtype;
use gradleak::io::safetensors::{read_batch, read_model, write_gradient};
use gradleak::model::{Activation, Loss, Mlp, Targets, cast_mat};

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// The model the server sent (safetensors, nn.Sequential names: 0.weight, 0.bias, 2.weight, ...).
    #[arg(long)]
    model: PathBuf,
    /// The private batch (safetensors with `x` B x d and `y`: class indices for ce, values for mse/bce).
    #[arg(long)]
    batch: PathBuf,
    /// Activation between layers.
    #[arg(long, value_parser = values::activation())]
    activation: Activation,
    /// Loss with mean reduction: mse, ce (cross-entropy), bce (with logits).
    #[arg(long, value_parser = values::loss())]
    loss: Loss,
    /// Where to write the gradient (safetensors, same names as the model).
    #[arg(long)]
    out: PathBuf,
}

/// Targets from the batch file's `y`, shaped for the loss and the model's output.
pub fn targets_from(
    y: Option<&Mat<f64>>,
    loss: Loss,
    k: usize,
    b: usize,
) -> anyhow::Result<Targets> {
    let Some(y) = y else {
        bail!("the batch file has no 'y' (targets)")
    };
    match loss {
        Loss::Ce => {
            if y.ncols() != 1 {
                bail!(
                    "cross-entropy needs 'y' as B class indices, got {} x {}",
                    y.nrows(),
                    y.ncols()
                );
            }
            let mut c = Vec::with_capacity(b);
            for i in 0..b {
                let v = y[(i, 0)];
                if v < 0.0 || v.fract() != 0.0 || v as usize >= k {
                    bail!("'y' holds {v}, not a class index in 0..{k}");
                }
                c.push(v as usize);
            }
            Ok(Targets::Classes(c))
        }
        Loss::Mse | Loss::Bce => {
            if y.ncols() != k {
                bail!("'y' has {} columns but the model outputs {k}", y.ncols());
            }
            Ok(Targets::Values(y.clone()))
        }
    }
}

pub fn run(a: ClientArgs) -> anyhow::Result<()> {
    let (act, loss) = (a.activation, a.loss);
    let (model, dtype) = read_model(&a.model, act)?;
    let batch = read_batch(&a.batch)?;
    let targets = targets_from(batch.y.as_ref(), loss, model.output_dim(), batch.x.nrows())
        .with_context(|| format!("{}", a.batch.display()))?;
    // half-precision models are computed (and the gradient written) in f32
    match dtype.compute() {
        Dtype::Bf16 | Dtype::F16 | Dtype::F32 => {
            let m: Mlp<f32> = model.cast();
            let x: Mat<f32> = cast_mat(batch.x.as_ref());
            write_gradient(&a.out, &m.gradient(x.as_ref(), &targets, loss)?)?;
        }
        Dtype::F64 => write_gradient(&a.out, &model.gradient(batch.x.as_ref(), &targets, loss)?)?,
    }
    eprintln!(
        "wrote {} ({dtype}, batch of {})",
        a.out.display(),
        batch.x.nrows()
    );
    Ok(())
}
