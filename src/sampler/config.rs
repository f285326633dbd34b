//! Reading a diffusers `scheduler_config.json`: the settings this crate uses, checked, with
//! diffusers' defaults where a key is absent.

use super::dpm_solver::SecondOrderForm;
use super::registry::SamplerKind;
use super::unipc::BFunction;
use super::X0Clip;
use crate::diffusion::schedule::{BetaSchedule, NoiseSchedule, PredictionType, TimestepSpacing};
use crate::diffusion::variance::Variance;
use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// Which stochastic process a score-SDE config describes.
#[derive(Debug, Clone, PartialEq)]
pub enum SdeFamily {
    /// A discrete DDPM-style schedule (any diffusers discrete scheduler).
    Discrete,
    /// `ScoreSdeVpScheduler`: linear beta(t) on continuous t.
    VpContinuous { beta_min: f64, beta_max: f64 },
    /// `ScoreSdeVeScheduler`.
    Ve { sigma_min: f64, sigma_max: f64 },
}

/// The settings of a diffusers scheduler config that this crate uses. Unknown keys are ignored
/// (as diffusers does); a known key with a bad value is an error naming it.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: Option<TimestepSpacing>,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: f64,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub rescale_betas_zero_snr: bool,
    pub variance_type: Variance,
    pub use_karras_sigmas: bool,
    pub solver_order: usize,
    pub second_order_form: SecondOrderForm,
    pub b_function: BFunction,
    pub lower_order_final: bool,
    /// DPM-Solver: timesteps whose log-SNR falls below this are never visited.
    pub lambda_min_clipped: f64,
    pub sde: SdeFamily,
    pub snr: f64,
    pub correct_steps: usize,
    pub sampling_eps: Option<f64>,
}

impl Default for SchedulerConfig {
    /// The DDPM paper's setup: T = 1000, linear betas from 1e-4 to 0.02, epsilon prediction.
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_schedule: BetaSchedule::Linear {
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: None,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            rescale_betas_zero_snr: false,
            variance_type: Variance::FixedSmall,
            use_karras_sigmas: false,
            solver_order: 2,
            second_order_form: SecondOrderForm::Midpoint,
            b_function: BFunction::Bh2,
            lower_order_final: true,
            lambda_min_clipped: f64::NEG_INFINITY,
            sde: SdeFamily::Discrete,
            snr: 0.16,
            correct_steps: 1,
            sampling_eps: None,
        }
    }
}

const NON_FINITE_INF: &str = "\u{0}Infinity";
const NON_FINITE_NEG_INF: &str = "\u{0}-Infinity";

/// Python's `json.dumps` writes the bare tokens `Infinity`, `-Infinity` and `NaN` (diffusers saves
/// `lambda_min_clipped: -Infinity`); JSON has no such numbers, so outside strings they become
/// marked strings that [`Fields::f64`] reads back.
fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            let replaced = [
                ("-Infinity", NON_FINITE_NEG_INF),
                ("Infinity", NON_FINITE_INF),
                ("NaN", "\u{0}NaN"),
            ]
            .into_iter()
            .find(|(token, _)| rest.starts_with(token));
            if let Some((token, marker)) = replaced {
                out.push_str(&serde_json::to_string(marker).expect("string"));
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Typed access to a JSON object whose errors name the key.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .or_else(|| match v.as_str() {
                        Some(NON_FINITE_INF) => Some(f64::INFINITY),
                        Some(NON_FINITE_NEG_INF) => Some(f64::NEG_INFINITY),
                        _ => None,
                    })
                    .ok_or_else(|| Error::bad_value(key, v, "a number"))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| Error::bad_value(key, v, "a non-negative integer"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| Error::bad_value(key, v, "true or false"))
            })
            .transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::bad_value(key, v, "a string"))
            })
            .transpose()
    }

    /// A string key restricted to `allowed` values.
    fn choice(&self, key: &str, allowed: &[&str]) -> Result<Option<String>> {
        match self.str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s) => Ok(Some(s.to_string())),
            Some(s) => Err(Error::bad_value(
                key,
                format!("\"{s}\""),
                &allowed.join(", "),
            )),
        }
    }

    /// A boolean key this crate only supports with one value.
    fn require_bool(&self, key: &str, supported: bool) -> Result<()> {
        match self.bool(key)? {
            Some(v) if v != supported => Err(Error::bad_value(
                key,
                v,
                &format!("{supported} (the other setting is not supported)"),
            )),
            _ => Ok(()),
        }
    }
}

impl SchedulerConfig {
    /// Parses the JSON text of a diffusers scheduler config.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&quote_non_finite(text))
            .map_err(|e| Error::Msg(format!("not valid JSON: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| Error::Msg("a scheduler config must be a JSON object".into()))?;
        Self::from_map(map)
    }

    /// Reads a `scheduler_config.json`; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_json_str(&text).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    fn from_map(map: &Map<String, Value>) -> Result<Self> {
        let f = Fields(map);
        let mut c = Self {
            class_name: f.str("_class_name")?.map(str::to_string),
            ..Self::default()
        };
        let class_kind = c
            .class_name
            .as_deref()
            .map(SamplerKind::from_class_name)
            .transpose()?;
        if let Some(n) = f.usize("num_train_timesteps")? {
            c.num_train_timesteps = n;
        }
        let beta_start = f.f64("beta_start")?.unwrap_or(1e-4);
        let beta_end = f.f64("beta_end")?.unwrap_or(0.02);
        let schedule_name = f.choice(
            "beta_schedule",
            &["linear", "scaled_linear", "squaredcos_cap_v2"],
        )?;
        c.beta_schedule = match schedule_name.as_deref().unwrap_or("linear") {
            "scaled_linear" => BetaSchedule::ScaledLinear {
                beta_start,
                beta_end,
            },
            "squaredcos_cap_v2" => BetaSchedule::SquaredCosCapV2,
            _ => BetaSchedule::Linear {
                beta_start,
                beta_end,
            },
        };
        if let Some(v) = f.get("trained_betas") {
            let betas = v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| Error::bad_value("trained_betas", v, "a list of numbers"))?;
            c.beta_schedule = BetaSchedule::Trained(betas);
        }
        if let Some(p) = f.str("prediction_type")? {
            c.prediction_type = PredictionType::parse(p)?;
        }
        if let Some(s) = f.str("timestep_spacing")? {
            c.timestep_spacing = Some(TimestepSpacing::parse(s)?);
        }
        if let Some(v) = f.usize("steps_offset")? {
            c.steps_offset = v;
        }
        // diffusers' default differs by class: DDIM True, PNDM False.
        c.set_alpha_to_one = f
            .bool("set_alpha_to_one")?
            .unwrap_or(class_kind != Some(SamplerKind::Pndm));
        c.clip_sample = f.bool("clip_sample")?;
        if let Some(v) = f.f64("clip_sample_range")? {
            c.clip_sample_range = v;
        }
        if let Some(v) = f.bool("thresholding")? {
            c.thresholding = v;
        }
        if let Some(v) = f.f64("dynamic_thresholding_ratio")? {
            c.dynamic_thresholding_ratio = v;
        }
        if let Some(v) = f.f64("sample_max_value")? {
            c.sample_max_value = v;
        }
        if let Some(v) = f.bool("rescale_betas_zero_snr")? {
            c.rescale_betas_zero_snr = v;
        }
        if let Some(v) = f.choice(
            "variance_type",
            &["fixed_small", "fixed_large", "learned_range"],
        )? {
            c.variance_type = match v.as_str() {
                "fixed_large" => Variance::FixedLarge,
                "learned_range" => Variance::LearnedRange,
                _ => Variance::FixedSmall,
            };
        }
        if let Some(v) = f.bool("use_karras_sigmas")? {
            c.use_karras_sigmas = v;
        }
        let sigma_spacings = [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
        ];
        let chosen: Vec<&str> = sigma_spacings
            .into_iter()
            .filter(|k| f.bool(k).ok().flatten() == Some(true))
            .collect();
        if chosen.len() > 1 {
            return Err(Error::Contradiction(format!(
                "{} are all true; pick one sigma spacing",
                chosen.join(" and ")
            )));
        }
        for unsupported in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
            "euler_at_final",
        ] {
            f.require_bool(unsupported, false)?;
        }
        f.choice("interpolation_type", &["linear"])?;
        f.choice("final_sigmas_type", &["zero"])?;
        f.choice("timestep_type", &["discrete"])?;
        if let Some(v) = f.usize("solver_order")? {
            if !(1..=3).contains(&v) {
                return Err(Error::bad_value("solver_order", v, "1, 2 or 3"));
            }
            c.solver_order = v;
        }
        f.choice("algorithm_type", &["dpmsolver++"])?;
        if let Some(v) = f.choice("solver_type", &["midpoint", "heun", "bh1", "bh2"])? {
            match (class_kind, v.as_str()) {
                (Some(SamplerKind::UniPc), "bh1") => c.b_function = BFunction::Bh1,
                (Some(SamplerKind::UniPc), "bh2") => c.b_function = BFunction::Bh2,
                (Some(SamplerKind::UniPc), other) => {
                    return Err(Error::bad_value(
                        "solver_type",
                        other,
                        "bh1, bh2 (for UniPC)",
                    ))
                }
                (_, "heun") => c.second_order_form = SecondOrderForm::Heun,
                (_, "midpoint") => c.second_order_form = SecondOrderForm::Midpoint,
                (_, other) => {
                    return Err(Error::bad_value(
                        "solver_type",
                        other,
                        "midpoint, heun (for DPM-Solver)",
                    ))
                }
            }
        }
        if let Some(v) = f.f64("lambda_min_clipped")? {
            c.lambda_min_clipped = v;
        }
        if let Some(v) = f.bool("lower_order_final")? {
            c.lower_order_final = v;
        }
        if f.get("disable_corrector")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(Error::bad_value(
                "disable_corrector",
                f.get("disable_corrector").expect("checked"),
                "[] (disabling UniPC's corrector is not supported)",
            ));
        }
        if class_kind == Some(SamplerKind::Pndm) {
            f.require_bool("skip_prk_steps", true)?;
        }
        if let Some(v) = f.f64("snr")? {
            c.snr = v;
        }
        if let Some(v) = f.usize("correct_steps")? {
            c.correct_steps = v;
        }
        c.sampling_eps = f.f64("sampling_eps")?;
        match class_kind {
            Some(SamplerKind::Sde) => {
                c.num_train_timesteps = f.usize("num_train_timesteps")?.unwrap_or(2000);
                c.sde = SdeFamily::VpContinuous {
                    beta_min: f.f64("beta_min")?.unwrap_or(0.1),
                    beta_max: f.f64("beta_max")?.unwrap_or(20.0),
                };
            }
            Some(SamplerKind::Pc) => {
                c.num_train_timesteps = f.usize("num_train_timesteps")?.unwrap_or(2000);
                let sigma_min = f.f64("sigma_min")?.unwrap_or(0.01);
                let sigma_max = f.f64("sigma_max")?.unwrap_or(1348.0);
                if !(sigma_min > 0.0 && sigma_max > sigma_min) {
                    return Err(Error::Contradiction(format!(
                        "sigma_min = {sigma_min} and sigma_max = {sigma_max}: need 0 < sigma_min < sigma_max"
                    )));
                }
                c.sde = SdeFamily::Ve {
                    sigma_min,
                    sigma_max,
                };
                c.snr = f.f64("snr")?.unwrap_or(0.15);
            }
            _ => {}
        }
        // A schedule of one step has no interval to interpolate sigmas or timesteps in.
        if c.num_train_timesteps < 2 {
            return Err(Error::bad_value(
                "num_train_timesteps",
                c.num_train_timesteps,
                "at least 2",
            ));
        }
        Ok(c)
    }

    /// The sampler the config's `_class_name` names, if any.
    pub fn class_kind(&self) -> Result<Option<SamplerKind>> {
        self.class_name
            .as_deref()
            .map(SamplerKind::from_class_name)
            .transpose()
    }

    pub fn noise_schedule(&self) -> Result<NoiseSchedule> {
        NoiseSchedule::new(
            &self.beta_schedule,
            self.num_train_timesteps,
            self.rescale_betas_zero_snr,
        )
    }

    pub(crate) fn x0_clip(&self, kind: SamplerKind) -> X0Clip {
        // clip_sample defaults to true in diffusers' DDPM and DDIM only.
        let clip_default = matches!(kind, SamplerKind::Ddpm | SamplerKind::Ddim);
        if self.thresholding {
            X0Clip::Threshold {
                ratio: self.dynamic_thresholding_ratio,
                max_value: self.sample_max_value,
            }
        } else if self.clip_sample.unwrap_or(clip_default) {
            X0Clip::Clip {
                range: self.clip_sample_range,
            }
        } else {
            X0Clip::None
        }
    }
}
