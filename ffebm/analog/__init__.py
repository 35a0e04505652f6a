"""Simulated analog crossbar tiles: device physics, reads, pulsed updates, inference drift,
analog training algorithms and layers."""
from .config import InvalidSetting, IOConfig, UpdateConfig
from .devices import (
    DEVICE_REGISTRY, ConstantStep, DeviceParams, ExpStep, IdealDevice, LinearStep,
    PiecewiseStep, PowStep, PulsedDevice, SoftBounds, device_from_name, register_device,
)
from .integrate import apply_pulses
from .pulses import coincidence_counts, pulse_probabilities
from .device_array import DeviceArray
from .tile import AnalogTile, find_analog_tiles, is_analog_tile, read_backward, read_forward
from .kernels import KernelUnavailable, cpu_kernels, set_cpu_kernels
from .bound_management import read_forward_managed
from .drift import PCMDriftModel, ProgrammedWeights, drift_compensation_factor

# -- training algorithms, optimizer, layers, conversion
from .algorithms import (
    AGAD, AnalogAlgorithm, AnalogSGD, ChoppedTTv2, MixedPrecision, TikiTaka, TTv1, TTv2,
    algorithm_from_name, algorithm_names, register_algorithm,
)
from .convert import convert_to_analog, convert_to_digital
from .context import AnalogContext, UnownedAnalogWeight
from .layers import (
    AnalogConfig, AnalogLinear, analog_context, analog_parameters, digital_parameters, is_analog_parameter,
)
from .conv import AnalogConv1d, AnalogConv2d, AnalogGroupedConv
from .state import IncompatibleState, StateRemapped
from .stats import AnalogStats, TileStats, analog_stats
from .optimizer import AnalogOptimizer

# -- energy blocks on tiles (relaxation reads through the read model, EP updates as pulses)
from .energy import (AnalogConvCoupling, AnalogDenseCoupling, AnalogEP, analog_couplings, analog_energy_block,
                     to_analog_energy)

# -- inference tiles (hardware-aware training, programming, drift, compensation)
from .inference import InferenceConfig, WeightClip, WeightModifier
from .inference_layers import (InferenceConv1d, InferenceConv2d, InferenceLinear, ProgrammedWeightChanged,
                               clip_after_step, clip_weights, inference_modules)
from .inference_energy import (InferenceConvCoupling, InferenceDenseCoupling, InferenceEP, InferenceImplicit,
                               ModifierOutsideCall)
from .deploy import deployed, drift_to, evaluate_over_time, program, unprogram
