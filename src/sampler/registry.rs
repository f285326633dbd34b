//! Every sampler in one table: its command-line name, the diffusers scheduler classes that
//! stand for it, when to use it, and whether it walks a sigma grid. The names, the guide
//! (`diffuse samplers`), the parsers and their error messages all read this table.

use crate::error::{Error, Result};

/// Every sampler, by the name the command line takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Ddpm,
    Ddim,
    Pndm,
    Lms,
    Euler,
    EulerAncestral,
    Heun,
    DpmPp2m,
    UniPc,
    Rk45,
    Sde,
    Pc,
    Ald,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 13] = [
        Self::Ddpm,
        Self::Ddim,
        Self::Pndm,
        Self::Lms,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::DpmPp2m,
        Self::UniPc,
        Self::Rk45,
        Self::Sde,
        Self::Pc,
        Self::Ald,
    ];

    pub fn cli_name(self) -> &'static str {
        info(self).name
    }

    pub fn allowed_names() -> String {
        Self::ALL.map(|k| k.cli_name()).join(", ")
    }

    /// The sampler a command-line name picks.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name() == name)
            .ok_or_else(|| Error::bad_value("--sampler", name, &Self::allowed_names()))
    }

    /// The sampler a diffusers `_class_name` stands for.
    pub fn from_class_name(class: &str) -> Result<Self> {
        REGISTRY
            .iter()
            .find(|entry| entry.class_names.contains(&class))
            .map(|entry| entry.kind)
            .ok_or_else(|| Error::bad_value("_class_name", class, &class_names()))
    }

    /// The name AUTOMATIC1111's API uses, else the command-line name.
    pub fn a1111_name(self) -> &'static str {
        info(self).a1111_name.unwrap_or(info(self).name)
    }

    /// The sampler an AUTOMATIC1111 `sampler_name` picks (its own names, any case, or ours).
    pub fn from_a1111_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| {
            k.a1111_name().eq_ignore_ascii_case(name) || k.cli_name().eq_ignore_ascii_case(name)
        })
    }

    /// Samplers that walk a sigma grid and so can take Karras spacing.
    pub fn uses_sigmas(self) -> bool {
        info(self).uses_sigmas
    }
}

/// One sampler's entry.
#[derive(Debug, Clone, Copy)]
pub struct SamplerInfo {
    pub kind: SamplerKind,
    /// The name on the command line (`--sampler`) and in PNG metadata.
    pub name: &'static str,
    /// diffusers `_class_name`s that pick this sampler from a scheduler config.
    pub class_names: &'static [&'static str],
    /// One line on when to use it.
    pub guide: &'static str,
    /// Walks a sigma grid, so takes Karras spacing.
    pub uses_sigmas: bool,
    /// The name AUTOMATIC1111's web UI and API give the same solver (`sampler_name`), where it
    /// has one.
    pub a1111_name: Option<&'static str>,
}

pub const REGISTRY: [SamplerInfo; 13] = [
    SamplerInfo {
        kind: SamplerKind::Ddpm,
        name: "ddpm",
        a1111_name: Some("DDPM"),
        class_names: &["DDPMScheduler"],
        guide: "DDPM ancestral sampling (Ho et al. 2020): the reference; needs hundreds of steps",
        uses_sigmas: false,
    },
    SamplerInfo {
        kind: SamplerKind::Ddim,
        name: "ddim",
        a1111_name: Some("DDIM"),
        class_names: &["DDIMScheduler"],
        guide: "DDIM (Song et al. 2021): deterministic at eta 0, good from 20-50 steps; --eta 1 is DDPM-like",
        uses_sigmas: false,
    },
    SamplerInfo {
        kind: SamplerKind::Pndm,
        name: "pndm",
        a1111_name: Some("PLMS"),
        class_names: &["PNDMScheduler"],
        guide: "PLMS (Liu et al. 2022): SD 1.x's default; 4th-order multistep, fine at 50 steps",
        uses_sigmas: false,
    },
    SamplerInfo {
        kind: SamplerKind::Lms,
        name: "lms",
        a1111_name: Some("LMS"),
        class_names: &["LMSDiscreteScheduler"],
        guide: "linear multistep on the sigma ODE: smooth results at 20-50 steps",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::Euler,
        name: "euler",
        a1111_name: Some("Euler"),
        class_names: &["EulerDiscreteScheduler"],
        guide: "Euler on the probability-flow ODE: simple and robust, 20-50 steps",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::EulerAncestral,
        name: "euler-a",
        a1111_name: Some("Euler a"),
        class_names: &["EulerAncestralDiscreteScheduler"],
        guide: "Euler ancestral: adds fresh noise each step; varied, softer images; not convergent in steps",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::Heun,
        name: "heun",
        a1111_name: Some("Heun"),
        class_names: &["HeunDiscreteScheduler"],
        guide: "Heun (Karras et al. 2022): 2nd order, 2 evaluations a step; accurate at 10-30 steps",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::DpmPp2m,
        name: "dpmpp-2m",
        a1111_name: Some("DPM++ 2M"),
        class_names: &["DPMSolverMultistepScheduler"],
        guide: "DPM-Solver++(2M): the best quality for few steps (15-25), with --karras",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::UniPc,
        name: "unipc",
        a1111_name: Some("UniPC"),
        class_names: &["UniPCMultistepScheduler"],
        guide: "UniPC: predictor-corrector multistep; strongest at very few steps (5-15)",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::Rk45,
        name: "rk45",
        a1111_name: None,
        class_names: &[],
        guide: "adaptive Dormand-Prince on the ODE: set accuracy by --rtol/--atol; reports evaluations",
        uses_sigmas: true,
    },
    SamplerInfo {
        kind: SamplerKind::Sde,
        name: "sde",
        a1111_name: None,
        class_names: &["ScoreSdeVpScheduler"],
        guide: "reverse-SDE Euler-Maruyama (Song et al. 2021): stochastic, needs many steps",
        uses_sigmas: false,
    },
    SamplerInfo {
        kind: SamplerKind::Pc,
        name: "pc",
        a1111_name: None,
        class_names: &["ScoreSdeVeScheduler"],
        guide: "predictor-corrector (Song et al. 2021, Alg. 2/3): reverse diffusion + Langevin; best SDE quality",
        uses_sigmas: false,
    },
    SamplerInfo {
        kind: SamplerKind::Ald,
        name: "ald",
        a1111_name: None,
        class_names: &[],
        guide: "annealed Langevin dynamics (NCSN): corrector only; needs many steps and corrector iterations",
        uses_sigmas: false,
    },
];

/// The table's entry for `kind`.
pub fn info(kind: SamplerKind) -> &'static SamplerInfo {
    REGISTRY
        .iter()
        .find(|entry| entry.kind == kind)
        .expect("every sampler kind has an entry in REGISTRY")
}

/// Every diffusers class name the table knows, comma-separated (for error messages).
pub fn class_names() -> String {
    REGISTRY
        .iter()
        .flat_map(|entry| entry.class_names.iter().copied())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_entry_and_names_are_unique() {
        for kind in SamplerKind::ALL {
            assert_eq!(
                REGISTRY.iter().filter(|e| e.kind == kind).count(),
                1,
                "{kind:?}"
            );
        }
        let names: std::collections::BTreeSet<&str> = REGISTRY.iter().map(|e| e.name).collect();
        assert_eq!(names.len(), REGISTRY.len());
        let classes: Vec<&str> = REGISTRY
            .iter()
            .flat_map(|e| e.class_names.iter().copied())
            .collect();
        let unique: std::collections::BTreeSet<&&str> = classes.iter().collect();
        assert_eq!(unique.len(), classes.len());
    }
}
