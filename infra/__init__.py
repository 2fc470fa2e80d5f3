"""Infrastructure as code for Keycell's cells: `aws` (CDK), `azure` (ARM), `gcp` (Terraform)."""
