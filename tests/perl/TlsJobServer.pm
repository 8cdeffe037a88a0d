package TlsJobServer;
# The command-line options and the job server entry that gearman_client.pl and
# gearman_worker.pl share: how libgearman-client-perl (Gearman::Objects) takes TLS settings.
use strict;
use warnings;

use Exporter qw(import);
use Getopt::Long qw(GetOptions);

our @EXPORT_OK = qw(parse_options job_server);

# --port N [--host H] [--ca CA.pem] [--cert CERT.pem --key KEY.pem] [--tls-version V], plus
# the script's own option specs; dies with `$usage` on a bad command line.
sub parse_options {
    my ($usage, $arguments, %defaults) = @_;
    my %option = (host => '127.0.0.1', %defaults);
    GetOptions(\%option, 'host=s', 'port=i', 'ca=s', 'cert=s', 'key=s', 'tls-version=s',
        @{$arguments})
        && $option{port}
        or die "usage: $0 $usage\n";
    return \%option;
}

# Gearman::Objects::socket turns use_ssl into an IO::Socket::SSL connection and hands
# ca_file/cert_file/key_file to it as SSL_ca_file/SSL_cert_file/SSL_key_file. IO::Socket::SSL
# verifies the server's certificate and host name (here the IP address) by default.
sub job_server {
    my ($option) = @_;
    my %server = (host => $option->{host}, port => $option->{port}, use_ssl => 1);
    $server{ca_file}   = $option->{ca}   if $option->{ca};
    $server{cert_file} = $option->{cert} if $option->{cert};
    $server{key_file}  = $option->{key}  if $option->{key};
    # The library has no TLS version setting; its socket_cb may change IO::Socket::SSL's
    # arguments before it connects.
    if (my $version = $option->{'tls-version'}) {
        $server{socket_cb} = sub { $_[0]->{SSL_version} = $version };
    }
    return \%server;
}

1;
