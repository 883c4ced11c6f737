# ihb appliance image (Packer HCL2, qemu builder; works with Debian's packer 1.6.6).
#
# Starts from the Debian 12 cloud image, logs in over SSH with a build-only account
# that cloud-init creates from http/user-data, runs the provisioning scripts in
# scripts/ (the same ones build-local.sh runs in a chroot), and removes the build
# account on shutdown. Output: OUTPUT_DIR/ihb-appliance.qcow2 (system disk) and
# OUTPUT_DIR/ihb-appliance.qcow2-1 (blank data disk, formatted by the appliance at
# first boot).
#
#   cd packer && packer build -var accelerator=kvm .
#   packer build -var base_image=/path/debian-12-genericcloud-amd64.qcow2 \
#                -var base_image_checksum=none -var output_dir=/tmp/ihb-out .
#
# Without a reachable cloud image, use ./build-local.sh (same appliance, from Debian
# packages alone). See docs/appliance.md.

packer {
  required_version = ">= 1.6.6"
}

variable "base_image" {
  type        = string
  description = "Debian 12 cloud image (qcow2 with cloud-init): URL or local path."
  default     = "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
}

variable "base_image_checksum" {
  type        = string
  description = "Checksum of base_image (\"sha512:...\", \"file:URL\" or \"none\")."
  default     = "file:https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
}

variable "accelerator" {
  type        = string
  description = "QEMU accelerator: tcg (software, works everywhere) or kvm."
  default     = "tcg"
}

variable "cpu_model" {
  type        = string
  description = "QEMU -cpu of the build VM (max: every feature TCG or KVM can offer)."
  default     = "max"
}

variable "disk_size" {
  type        = string
  description = "System disk size; cloud-init grows the root file system to it."
  default     = "4G"
}

variable "data_disk_size" {
  type        = string
  description = "Size of the blank data disk made beside the image (repository, /srv/ihb)."
  default     = "20G"
}

variable "output_dir" {
  type        = string
  description = "Directory for the images; must not exist yet."
  default     = "output-ihb-appliance"
}

variable "memory" {
  type    = number
  default = 2048
}

variable "cpus" {
  type    = number
  default = 2
}

variable "apt_upgrade" {
  type        = string
  description = "1: install pending Debian updates during the build."
  default     = "1"
}

variable "ca_bundle" {
  type        = string
  description = "CA bundle pip trusts during the build (the host's, e.g. for a TLS-inspecting proxy)."
  default     = "/etc/ssl/certs/ca-certificates.crt"
}

variable "compress" {
  type        = bool
  description = "Compress the output qcow2."
  default     = false
}

variable "serial_log" {
  type        = string
  description = "Where the build VM's serial console goes."
  default     = "ihb-appliance-build-serial.log"
}

locals {
  build_dir   = "/tmp/ihb-build"
  src_tarball = "${path.root}/.ihb-src.tar.gz"
  # build-only account, made by cloud-init from http/user-data, deleted at shutdown
  build_user     = "packer"
  build_password = "packer-build-only"
}

source "qemu" "ihb_appliance" {
  iso_url              = var.base_image
  iso_checksum         = var.base_image_checksum
  disk_image           = true
  use_backing_file     = false
  disk_size            = var.disk_size
  disk_additional_size = [var.data_disk_size]
  disk_compression     = var.compress
  format               = "qcow2"
  disk_interface       = "virtio"
  disk_discard         = "unmap" # with fstrim in 90-cleanup.sh: freed blocks leave the image
  disk_detect_zeroes   = "unmap"
  net_device           = "virtio-net"
  accelerator          = var.accelerator
  headless             = true
  memory               = var.memory
  cpus                 = var.cpus
  http_directory       = "${path.root}/http"
  qemuargs = [
    ["-cpu", var.cpu_model],
    # cloud-init NoCloud data source: user-data/meta-data from Packer's HTTP server
    ["-smbios", "type=1,serial=ds=nocloud-net;s=http://{{ .HTTPIP }}:{{ .HTTPPort }}/"],
    ["-serial", "file:${var.serial_log}"],
  ]
  communicator     = "ssh"
  ssh_username     = local.build_user
  ssh_password     = local.build_password
  ssh_timeout      = "20m"
  shutdown_command = "sudo -n sh -c 'userdel -r -f ${local.build_user}; rm -f /etc/sudoers.d/90-cloud-init-users; poweroff'"
  output_directory = var.output_dir
  vm_name          = "ihb-appliance.qcow2"
}

build {
  sources = ["source.qemu.ihb_appliance"]

  # the project source, as pip installs it (reproducible tarball, see make-source-tarball.sh)
  provisioner "shell-local" {
    inline = ["'${path.root}/make-source-tarball.sh' '${path.root}/..' '${local.src_tarball}'"]
  }

  provisioner "shell" {
    inline = ["cloud-init status --wait >/dev/null 2>&1 || true", "mkdir -p ${local.build_dir}"]
  }

  provisioner "file" {
    sources     = ["${path.root}/scripts", "${path.root}/files"]
    destination = "${local.build_dir}/"
  }

  provisioner "file" {
    source      = local.src_tarball
    destination = "${local.build_dir}/ihb-src.tar.gz"
    generated   = true
  }

  provisioner "file" {
    source      = var.ca_bundle
    destination = "${local.build_dir}/ca-bundle.crt"
  }

  # the same scripts, in the same order, as build-local.sh runs in its chroot
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo -n sh -c '{{ .Vars }} {{ .Path }}'"
    environment_vars = [
      "IHB_BUILD_DIR=${local.build_dir}",
      "IHB_APT_UPGRADE=${var.apt_upgrade}",
      "IHB_BUILDER=packer",
    ]
    scripts = [for s in sort(fileset(path.root, "scripts/[0-9][0-9]-*.sh")) : "${path.root}/${s}"]
  }
}
