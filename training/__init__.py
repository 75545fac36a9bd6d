"""FluxSR training: teacher pairs, Real-ESRGAN degradation, FTD distillation (installed as fluxsr_training)."""
