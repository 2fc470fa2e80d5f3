variable "project" {
  description = "GCP project that holds the cell"
  type        = string
}

variable "deployment_name" {
  description = "Prefix of every resource name ([deployment] name in infra/cells.toml)"
  type        = string
  default     = "keycell"
}

variable "cell_id" {
  description = "The cell's id in infra/cells.toml"
  type        = string
  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,19}$", var.cell_id))
    error_message = "A cell id is 1-20 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "region" {
  description = "Region of the cell (Cloud Run, KMS key ring, Firestore location)"
  type        = string
}

variable "image" {
  description = "The Keycell container image: the API, rotation and revocation functions and the relay"
  type        = string
  default     = "ghcr.io/keycell/keycell:0.1.0"
}

variable "relays" {
  description = "Relay instances kept running (long-lived: min and max instances)"
  type        = number
  default     = 3
  validation {
    condition     = var.relays >= 1 && var.relays <= 30
    error_message = "Between 1 and 30 relays."
  }
}

variable "relay_port" {
  description = "gRPC port of the relays"
  type        = number
  default     = 7946
}

variable "relay_peers" {
  description = "host:port of the relays of the other cells"
  type        = list(string)
  default     = []
}

variable "relay_tls_secret" {
  description = "Prefix of three Secret Manager secrets (<prefix>-cert, -key, -ca) with the relays' mTLS PEMs; empty: none"
  type        = string
  default     = ""
}

variable "api_max_instances" {
  description = "Upper bound on API instances: the cell's share of the project's quota"
  type        = number
  default     = 100
}

variable "key_rotation_period" {
  description = "Cloud KMS automatic rotation period of the cell's wrapping key"
  type        = string
  default     = "7776000s" # 90 days
}

variable "vpc_connector" {
  description = "Serverless VPC Access connector the functions and relays send their egress through"
  type        = string
}

variable "api_invokers" {
  description = "Principals allowed to invoke the regional API (Vault clients authenticate to Keycell itself; allUsers makes the API public behind its own tokens)"
  type        = list(string)
  default     = []
}

variable "rotation_command" {
  description = "Command of the rotation service: serves Pub/Sub pushes (SECRET_ROTATE) on port 8080 at /pubsub"
  type        = list(string)
  default     = ["keycell", "rotation", "serve", "--listen", "0.0.0.0:8080"]
}

variable "revocation_command" {
  description = "Command of the revocation service: serves Pub/Sub pushes on port 8080 at /pubsub"
  type        = list(string)
  default     = ["keycell", "revocation", "serve", "--listen", "0.0.0.0:8080"]
}
