# ihb appliance: admin shells find the ihb command and its configuration.
# Installed by the image build (packer/files/rootfs/etc/profile.d/ihb.sh).
export IHB_CONFIG=/etc/ihb/config.toml
