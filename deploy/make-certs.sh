#!/bin/sh
# Make a private CA, a server certificate and client certificates for a jobserver cluster
# (deploy/tls.md). Run it in an empty directory on a trusted machine:
#
#     sh make-certs.sh SERVER_NAMES IDENTITY...
#     sh make-certs.sh "DNS:jobs1.example.com,IP:10.0.0.5" webapp image-worker ops
#
# SERVER_NAMES is an X.509 subjectAltName list: every host name (DNS:) and address (IP:)
# clients use to reach the server; the SDKs verify it. Each IDENTITY becomes the subject CN
# of a client certificate, the name an --acl file gives rights to. Writes ca.pem/ca.key,
# server.pem/server.key and IDENTITY.pem/IDENTITY.key. Keep ca.key offline: only ca.pem goes
# to the machines.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: sh make-certs.sh SERVER_NAMES [IDENTITY...]" >&2
    exit 2
fi
server_names=$1
shift

CA_DAYS=3650      # the CA outlives the certificates it signs; rotate it deliberately
CERT_DAYS=825     # the longest validity clients commonly accept for a leaf certificate

# The CA: basicConstraints and keyUsage marked critical, as strict verifiers
# (Python 3.13's VERIFY_X509_STRICT default, Go) require of a CA certificate.
openssl req -x509 -newkey rsa:3072 -sha256 -days "$CA_DAYS" -nodes \
    -keyout ca.key -out ca.pem -subj "/CN=jobserver cluster CA" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() {  # issue NAME EXTENSIONS: NAME.key and NAME.pem, signed by the CA
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
    printf '%s\nauthorityKeyIdentifier=keyid,issuer\n' "$2" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days "$CERT_DAYS" -sha256 -extfile "$1.ext" -out "$1.pem"
    rm "$1.csr" "$1.ext"
    chmod 600 "$1.key"
}

issue server "subjectAltName=$server_names
extendedKeyUsage=serverAuth"
for identity in "$@"; do
    issue "$identity" "extendedKeyUsage=clientAuth"
done
chmod 600 ca.key
