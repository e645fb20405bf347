"""Stage 1 of the loop: pseudo-labels from a SAM-family model, or imported from any other model.

- :mod:`.sam`: checkpoints (SAM vit_b/vit_l/vit_h, MedSAM), the per-checkpoint
  preprocessing profiles, one encoder pass per slice with an on-disk embedding cache;
- :mod:`.slices`: volumes to SAM's 3-channel slices and masks back onto the voxel grid;
- :mod:`.prompts`: prompt files, slice-to-slice propagation, automatic mode, prompts from a prior label;
- :mod:`.postprocess`: connected components, holes, islands;
- :mod:`.run`: the per-case driver behind ``alseg pseudolabel --source sam``;
- :mod:`.imported`: labels made by another model, with a value mapping.
"""

# light constants (no torch import): the CLI's choices and defaults
MODEL_TYPES = ("litemedsam", "vit_b", "vit_l", "vit_h", "medsam")  # litemedsam: built in
REFERENCE_BOX_MARGIN = 5.0  # pixels of the encoder's input (256 for LiteMedSAM) around a box drawn from a reference
SIMULATE_REFERENCE_BOXES = 1  # boxes per structure per case in `alseg simulate --pseudo-source sam`
