//! The library's choice enums as clap values: the library's types carry no clap derive,
//! so each has a mirror here (same names, help from the doc comments) with a `From`
//! conversion, and a value parser that yields the library type itself.

use clap::ValueEnum;
use clap::builder::{EnumValueParser, MapValueParser, TypedValueParser};
use gradleak::attack::Method;
use gradleak::model::{Activation, Init, Loss};

/// A mirror enum `$name` of the library's `$lib` (same variants), its conversion, and
/// `$parser()`, a clap value parser for `$lib`.
macro_rules! mirror {
    ($(#[$m:meta])* $name:ident => $lib:ident, $parser:ident { $($(#[$vm:meta])* $v:ident,)* }) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
        $(#[$m])*
        pub enum $name {
            $($(#[$vm])* $v,)*
        }

        impl From<$name> for $lib {
            fn from(v: $name) -> Self {
                match v {
                    $($name::$v => $lib::$v,)*
                }
            }
        }

        /// A clap value parser for the library's type (possible values and their help
        /// from the mirror).
        pub fn $parser() -> MapValueParser<EnumValueParser<$name>, fn($name) -> $lib> {
            EnumValueParser::<$name>::new().map($lib::from as fn($name) -> $lib)
        }
    };
}

mirror! {
    /// `--activation`.
    #[value(rename_all = "snake_case")]
    ActivationValue => Activation, activation {
        Tanh,
        Sigmoid,
        Relu,
        LeakyRelu,
        Gelu,
        Silu,
        Softplus,
        Elu,
        Identity,
    }
}

mirror! {
    /// `--loss`.
    LossValue => Loss, loss {
        /// Mean squared error, averaged over all B x K entries (`nn.MSELoss`).
        Mse,
        /// Cross-entropy over K classes, averaged over the batch (`nn.CrossEntropyLoss`).
        Ce,
        /// Binary cross-entropy with logits, averaged over all entries (`nn.BCEWithLogitsLoss`).
        Bce,
    }
}

mirror! {
    /// `--init`.
    InitValue => Init, init {
        /// First layer i.i.d. N(0, s^2) on the augmented row (w_j, b_j), with
        /// s = 1 / sqrt(E||(x, 1)||^2) so that pre-activations have unit variance on the prior.
        Gaussian,
        /// As `Gaussian` on the centred inputs x - xbar, then b_j = -w_j . xbar + N(0, 1):
        /// the client sees an ordinary network (docs/DESIGN.md, "Centring").
        Centred,
        /// PyTorch's `nn.Linear` default: weight and bias U(-1/sqrt(in), 1/sqrt(in)).
        TorchDefault,
        /// Weights N(0, 2 / in) (`kaiming_normal_`, fan-in, ReLU gain), biases zero.
        KaimingNormal,
    }
}

mirror! {
    /// `--method`.
    MethodValue => Method, method {
        /// Exact single-sample recovery x = g_w / g_b.
        Analytic,
        /// Wang, Lee & Lei (2023): Hermite moments and tensor decomposition.
        Tensor,
        /// Levenberg-Marquardt on the exact gradient equations from tensor starts.
        Refine,
        /// Span-membership search for exact zeros.
        Span,
        /// The best available route for the case.
        Auto,
        /// Deep Leakage from Gradients (Zhu et al. 2019).
        Dlg,
        /// Inverting Gradients (Geiping et al. 2020).
        Ig,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value name of a mirror is the library's own name (what `FromStr`, the JSON
    /// report and the sweep CSV use), and every library value has a mirror.
    #[test]
    fn mirrors_spell_every_value_as_the_library_does() {
        fn check<V: ValueEnum + Copy, T: From<V> + std::fmt::Display + PartialEq>(all: &[T]) {
            let names: Vec<String> = V::value_variants()
                .iter()
                .map(|v| v.to_possible_value().unwrap().get_name().to_string())
                .collect();
            let lib: Vec<String> = V::value_variants()
                .iter()
                .map(|v| T::from(*v).to_string())
                .collect();
            assert_eq!(names, lib);
            assert_eq!(names.len(), all.len());
        }
        check::<ActivationValue, Activation>(&Activation::ALL);
        check::<LossValue, Loss>(&Loss::ALL);
        check::<InitValue, Init>(&Init::ALL);
        check::<MethodValue, Method>(&Method::ALL);
    }
}
