# Sourced: `make_test_ca DIR` makes a CA for one test run (DIR/ca.pem) and a certificate it signed
# for localhost and 127.0.0.1 (DIR/cert.pem, DIR/key.pem), all EC P-256, valid for a day.
make_test_ca() {
  (
    cd "$1"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
      -subj /CN=wsgate-test-ca -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost \
      -keyout key.pem -out leaf.csr 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
      -extfile leaf.ext -out cert.pem 2>/dev/null
  )
}
