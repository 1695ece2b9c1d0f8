"""Lightning modules and data modules for each training stage (pretrain, sft, distill)."""
